"""`stream`: send an audio file to the server, as a live speaker would or as fast as it accepts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

from real_time_audio.audio.files import duration_of
from real_time_audio.audio.formats import encoding_for
from rta_client.console import Console
from rta_client.session import ClientError, ClientOptions, LiveSession, SessionResult

PCM_WIDTH = {"pcm_s16le": 2, "pcm_f32le": 4}


def file_options(path: Path, options: ClientOptions) -> ClientOptions:
    """`options` with the encoding (and, for raw PCM, defaults) filled in for `path`."""
    if options.encoding == "auto":
        try:
            options.encoding = encoding_for(path)
        except ValueError as exc:
            raise ClientError(str(exc), 2) from None
    if options.encoding in PCM_WIDTH:
        options.sample_rate = options.sample_rate or 16000
        options.channels = options.channels or 1
    return options


def seconds_per_byte(path: Path, options: ClientOptions) -> float:
    """How long each byte of the file lasts when played, for pacing a real-time stream."""
    size = path.stat().st_size
    if options.encoding in PCM_WIDTH:
        assert options.sample_rate and options.channels
        return 1.0 / (options.sample_rate * options.channels * PCM_WIDTH[options.encoding])
    return duration_of(path) / size if size else 0.0


def chunks(path: Path, size: int) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while piece := handle.read(size):
            yield piece


async def stream_file(
    path: Path,
    options: ClientOptions,
    *,
    chunk_size: int = 8192,
    realtime: bool = False,
    console: Console | None = None,
    end_timeout_s: float | None = None,
) -> SessionResult:
    """Stream `path` through one session and return what the server sent."""
    if not path.is_file():
        raise ClientError(f"{path}: no such file", 2)
    options = file_options(path, options)
    pace = seconds_per_byte(path, options) if realtime else 0.0
    total = path.stat().st_size
    session = LiveSession(options, console.on_message if console else None)
    async with session:
        started = time.monotonic()
        sent = 0
        for piece in chunks(path, chunk_size):
            await session.send_audio(piece)
            sent += len(piece)
            if console:
                console.set_progress(f"{100 * sent / max(total, 1):3.0f}%")
            if pace:
                delay = started + sent * pace - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        if console:
            console.set_progress("finishing")
        result = await session.end(end_timeout_s)
    if console:
        console.set_progress("")
        console.finish()
    return result
