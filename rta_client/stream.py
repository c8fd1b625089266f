"""`stream`: send an audio file to the server, as a live speaker would or as fast as it accepts.

With `reconnect`, a session the server ends early (a restart: close 1001 after `shutting_down`;
a full server: 1013; a dropped connection) is continued in a new one. The server's
`shutting_down` message names the byte offset to resend from and the finals that the new session
replaces (the cut utterance, heard again whole); without it the client resends from the end of the
last final. The finals of all sessions are joined on one timeline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from real_time_audio.audio.files import duration_of
from real_time_audio.audio.formats import encoding_for
from rta_client.console import Console
from rta_client.resume import RETRYABLE_CLOSES, Timeline, joined, open_session, resume_point
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
    reconnect: bool = False,
    reconnect_timeout_s: float = 60.0,
) -> SessionResult:
    """Stream `path` through one session (or, with `reconnect`, as many as it takes) and return
    what the server sent."""
    if not path.is_file():
        raise ClientError(f"{path}: no such file", 2)
    if reconnect:
        return await _stream_resumable(path, options, chunk_size, realtime, console, end_timeout_s, reconnect_timeout_s)
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


def pcm_of(path: Path, options: ClientOptions) -> tuple[bytes, ClientOptions]:
    """The file as raw PCM, which can be resent from any sample: raw PCM as it is, a container
    decoded to 16 kHz mono 16-bit (as the server would hear it)."""
    options = file_options(path, options)
    if options.encoding in PCM_WIDTH:
        return path.read_bytes(), options
    from real_time_audio.audio.files import load_audio

    try:
        samples = load_audio(path, options.encoding)
    except ValueError as exc:
        raise ClientError(str(exc), 2) from None
    pcm = np.clip(np.round(samples * 32768), -32768, 32767).astype("<i2").tobytes()  # 16-bit input: exact
    options.encoding, options.sample_rate, options.channels = "pcm_s16le", 16000, 1
    return pcm, options


async def _stream_resumable(
    path: Path,
    options: ClientOptions,
    chunk_size: int,
    realtime: bool,
    console: Console | None,
    end_timeout_s: float | None,
    reconnect_timeout_s: float,
) -> SessionResult:
    audio, options = pcm_of(path, options)
    assert options.sample_rate and options.channels
    frame = options.channels * PCM_WIDTH[options.encoding]
    bytes_per_s = options.sample_rate * frame
    timeline = Timeline()
    position = 0  # the first byte the current session has not been sent
    started = time.monotonic()
    user_prompt = options.prompt
    while True:
        base = position
        timeline.offset_s = base / bytes_per_s
        session_options = replace(options, prompt=timeline.context(user_prompt))
        session = LiveSession(session_options, (lambda m: console.on_message(timeline.shifted(m))) if console else None)
        await open_session(session, console, reconnect_timeout_s)
        try:
            while position < len(audio):
                piece = audio[position : position + chunk_size]
                await session.send_audio(piece)
                position += len(piece)
                if console:
                    console.set_progress(f"{100 * position / max(len(audio), 1):3.0f}%")
                if realtime:  # a backlog resent after a reconnect goes at once; then the live pace
                    delay = started + position / bytes_per_s - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
            if console:
                console.set_progress("finishing")
            result = await session.end(end_timeout_s)
        except ClientError:  # closed while sending: what it said before closing is read below
            result = session.result
        finally:
            await session.close()
        if result.completed is not None or result.close_code not in RETRYABLE_CLOSES:
            break
        position, keep_below = resume_point(result, base, frame, bytes_per_s)
        timeline.close_session(result, keep_below)
        if console:
            console.note(
                f"session {result.session_id} closed ({result.close_code} {result.close_reason}); "
                f"going on from {position / bytes_per_s:.2f} s in a new session"
            )
    if console:
        console.set_progress("")
        console.finish()
    return joined(result, timeline)
