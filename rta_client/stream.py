"""`stream`: send an audio file to the server, as a live speaker would or as fast as it accepts.

With `reconnect`, a session the server ends early (a restart: close 1001 after `shutting_down`;
a full server: 1013; a dropped connection) is continued in a new one. The server's
`shutting_down` message names the byte offset to resend from and the finals that the new session
replaces (the words around the cut, heard again whole); without it the client resends from the end
of the last final. The finals of all sessions are joined on one timeline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from real_time_audio.audio.files import duration_of
from real_time_audio.audio.formats import encoding_for
from rta_client.console import Console
from rta_client.session import EXIT_CONNECT, ClientError, ClientOptions, LiveSession, SessionResult

PCM_WIDTH = {"pcm_s16le": 2, "pcm_f32le": 4}
# Close codes after which the stream goes on in a new session: going away (a restart), abnormal
# (the connection dropped), internal error, service restart, try again later (full).
RETRYABLE_CLOSES = frozenset({1001, 1006, 1011, 1012, 1013})
RECONNECT_FIRST_S = 0.25
RECONNECT_MAX_S = 4.0


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
            console.set_progress("")
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


@dataclass(slots=True)
class Timeline:
    """The finals of consecutive sessions over one stream, on the stream's own clock."""

    messages: list[dict[str, Any]] = field(default_factory=list)  # every final kept, shifted and renumbered
    offset_s: float = 0.0  # where the current session's audio starts in the stream
    first_segment: int = 0  # the stream-wide id of the current session's segment 0
    sessions: list[str] = field(default_factory=list)

    def shifted(self, message: dict[str, Any]) -> dict[str, Any]:
        """A message of the current session on the stream's clock (finals and partials)."""
        if message.get("type") != "transcription":
            return message
        moved = dict(message, segment_id=self.first_segment + message["segment_id"])
        moved["start"] = round(message["start"] + self.offset_s, 3)
        moved["end"] = round(message["end"] + self.offset_s, 3)
        if message.get("words"):
            moved["words"] = [
                dict(w, start=round(w["start"] + self.offset_s, 3), end=round(w["end"] + self.offset_s, 3))
                for w in message["words"]
            ]
        return moved

    def close_session(self, result: SessionResult, keep_below: int | None) -> None:
        """Keep the session's finals (those with an id below `keep_below`, or all)."""
        for final in result.finals:
            if keep_below is None or final["segment_id"] < keep_below:
                self.messages.append(self.shifted(final))
        self.first_segment = self.messages[-1]["segment_id"] + 1 if self.messages else 0


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
    while True:
        base = position
        timeline.offset_s = base / bytes_per_s
        session = LiveSession(options, (lambda m: console.on_message(timeline.shifted(m))) if console else None)
        await _connect(session, console, reconnect_timeout_s)
        timeline.sessions.append(session.result.session_id)
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
            timeline.close_session(result, None)
            break
        position, keep_below = _resume_point(result, base, frame, bytes_per_s)
        timeline.close_session(result, keep_below)
        if console:
            console.note(
                f"session {result.session_id} closed ({result.close_code} {result.close_reason}); "
                f"going on from {position / bytes_per_s:.2f} s in a new session"
            )
    if console:
        console.set_progress("")
        console.finish()
    # The last session's result (its `completed`, close code and checksum), with every session's finals.
    result.messages = [m for m in result.messages if m.get("type") != "transcription"] + timeline.messages
    return result


def _resume_point(result: SessionResult, base: int, frame: int, bytes_per_s: int) -> tuple[int, int | None]:
    """Where to resend from after `result`'s session ended early, and the first of its segment
    ids that the next session replaces (None: keep them all)."""
    shutdown = next((m for m in reversed(result.messages) if m.get("status") == "shutting_down"), None)
    if shutdown is not None and shutdown["resume"].get("bytes") is not None:
        resume = shutdown["resume"]
        return base + int(resume["bytes"]), int(resume["segment_id"])
    # No word from the server: from the end of the last final (what lies after it is heard again).
    finals = result.finals
    covered = round(finals[-1]["end"] * bytes_per_s) if finals else 0
    covered -= covered % frame
    return base + min(covered, result.sent_bytes - result.sent_bytes % frame), None


async def _connect(session: LiveSession, console: Console | None, timeout_s: float) -> None:
    """Open the session, retrying refusals and failed connections with a growing pause."""
    deadline = time.monotonic() + timeout_s
    pause = RECONNECT_FIRST_S
    while True:
        try:
            await session.connect()
            return
        except ClientError as exc:
            code = session.result.close_code
            retryable = exc.exit_code == EXIT_CONNECT or code in RETRYABLE_CLOSES
            if not retryable or time.monotonic() + pause > deadline:
                raise
            if console:
                console.note(f"{exc}; trying again in {pause:.2f} s")
        await asyncio.sleep(pause)
        pause = min(RECONNECT_MAX_S, pause * 2)
        session.reset()
