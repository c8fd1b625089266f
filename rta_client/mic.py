"""`mic`: live transcription from the microphone, driven by typed commands.

Commands (one per line on stdin): `start` connects and starts capturing, `stop` pauses capture and
asks the server to finalize what was said, `resume` captures again, `quit` ends the session (the
server sends its last finals and `completed`) and exits. Capture uses PortAudio through
sounddevice; the input stream is injectable so that tests can feed audio without a sound card.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any, Protocol

from rta_client.console import Console
from rta_client.resume import RETRYABLE_CLOSES, Timeline, joined, open_session, resume_point
from rta_client.session import ClientError, ClientOptions, LiveSession, SessionResult

COMMANDS = ("start", "stop", "resume", "quit")
HISTORY_S = 60.0  # audio kept to resend after a server restart
HELP = "commands: start | stop | resume | quit"
EXIT_NO_MICROPHONE = 4


class InputStream(Protocol):
    """The part of sounddevice's RawInputStream that the microphone mode uses."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


# (sample rate, channels, frames per block, called with each block of int16 bytes) -> stream
StreamFactory = Callable[[int, int, int, Callable[[bytes], None]], InputStream]


class MicrophoneUnavailable(ClientError):
    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_NO_MICROPHONE)


def sounddevice_stream(rate: int, channels: int, blocksize: int, on_audio: Callable[[bytes], None]) -> InputStream:
    """The default microphone: the system's default input device through PortAudio."""
    try:
        import sounddevice
    except ImportError:
        raise MicrophoneUnavailable("microphone mode needs the sounddevice package: pip install sounddevice") from None
    except OSError as exc:  # the package is there but the PortAudio library is not
        raise MicrophoneUnavailable(
            f"microphone mode needs the PortAudio library ({exc}); on Debian/Ubuntu: apt-get install libportaudio2"
        ) from None
    try:
        sounddevice.check_input_settings(samplerate=rate, channels=channels, dtype="int16")
    except Exception as exc:
        raise MicrophoneUnavailable(f"no usable microphone: {exc}") from None

    def callback(data: Any, frames: int, time: Any, status: Any) -> None:
        on_audio(bytes(data))

    stream: InputStream = sounddevice.RawInputStream(
        samplerate=rate, channels=channels, dtype="int16", blocksize=blocksize, callback=callback
    )
    return stream


async def stdin_commands() -> AsyncIterator[str]:
    """Lines typed on stdin; the end of input counts as `quit`."""
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            yield "quit"
            return
        yield line.strip().lower()


async def run_microphone(
    options: ClientOptions,
    commands: AsyncIterator[str],
    *,
    stream_factory: StreamFactory = sounddevice_stream,
    console: Console | None = None,
    sample_rate: int = 16000,
    block_s: float = 0.1,
    keepalive_s: float = 15.0,
    reconnect_timeout_s: float | None = None,
) -> SessionResult | None:
    """Run the command loop; returns the session's result, or None if it was never started.

    With `reconnect_timeout_s`, a session the server ends early (a restart, a full server, a
    dropped connection) goes on in a new one: the audio from the server's resume point (kept for
    the last `HISTORY_S`) is sent again, and the finals of all sessions come back as one timeline.
    """
    options.encoding, options.sample_rate, options.channels = "pcm_s16le", sample_rate, 1
    console = console or Console()
    loop = asyncio.get_running_loop()
    captured: asyncio.Queue[bytes] = asyncio.Queue()
    stream: InputStream | None = None
    session: LiveSession | None = None
    sender: asyncio.Task[None] | None = None
    keeper: asyncio.Task[None] | None = None
    recording = False
    bytes_per_s = sample_rate * 2
    timeline = Timeline()
    history: deque[tuple[int, bytes]] = deque()  # (offset in the session, bytes) of what was sent lately
    sent = 0  # bytes sent in the current session
    base = 0  # where the current session's audio starts in the whole recording

    def on_audio(data: bytes) -> None:  # called on PortAudio's thread
        loop.call_soon_threadsafe(captured.put_nowait, data)

    user_prompt = options.prompt

    def new_session() -> LiveSession:
        session_options = replace(options, prompt=timeline.context(user_prompt))
        return LiveSession(session_options, lambda message: console.on_message(timeline.shifted(message)))

    async def reopen() -> list[bytes]:
        """After the session ended early: a new one, and the audio to send it first."""
        nonlocal session, sent, base
        assert session is not None
        await session.close()  # everything it said has been read
        result = session.result
        offset, keep_below = resume_point(result, 0, 2, bytes_per_s)
        timeline.close_session(result, keep_below)
        resend = [data[max(0, offset - start) :] for start, data in history if start + len(data) > offset]
        base += offset
        timeline.offset_s = base / bytes_per_s
        console.note(
            f"session {result.session_id} closed ({result.close_code} {result.close_reason}); "
            f"going on from {timeline.offset_s:.2f} s in a new session"
        )
        assert reconnect_timeout_s is not None
        session, sent = new_session(), 0
        history.clear()
        await open_session(session, console, reconnect_timeout_s)
        return [piece for piece in resend if piece]

    def ended_early() -> bool:
        return (
            reconnect_timeout_s is not None
            and session is not None
            and session.result.completed is None
            and session.result.close_code in RETRYABLE_CLOSES
        )

    async def send(data: bytes) -> None:
        nonlocal sent
        pending = [data]
        while pending:
            assert session is not None
            try:
                await session.send_audio(pending[0])
            except ClientError:
                await session.close()  # read what it said before closing
                if not ended_early():
                    raise
                pending = [*await reopen(), *pending]
                continue
            piece = pending.pop(0)
            history.append((sent, piece))
            sent += len(piece)
            while history and sent - history[0][0] - len(history[0][1]) >= HISTORY_S * bytes_per_s:
                history.popleft()

    async def send_captured() -> None:
        while True:
            data = await captured.get()
            try:
                await send(data)
            finally:
                captured.task_done()

    async def keep_alive() -> None:
        while True:
            await asyncio.sleep(keepalive_s)
            if not recording and session is not None:
                await session.send_json({"type": "keepalive"})

    async def pause() -> None:
        nonlocal recording
        assert stream is not None and session is not None
        stream.stop()  # no callback runs after this returns
        recording = False
        await captured.join()  # everything captured so far has been sent
        await session.send_json({"type": "flush"})

    console.note(HELP)
    try:
        async for command in commands:
            if command == "start" and session is None:
                stream = stream_factory(sample_rate, 1, int(sample_rate * block_s), on_audio)
                session = new_session()
                await session.connect()
                sender = asyncio.create_task(send_captured())
                keeper = asyncio.create_task(keep_alive())
                stream.start()
                recording = True
                console.note("recording; type stop to pause, quit to finish")
            elif command == "stop" and recording:
                await pause()
                console.note("paused; type resume to go on, quit to finish")
            elif command in ("resume", "start") and session is not None and not recording:
                assert stream is not None
                stream.start()
                recording = True
                console.note("recording")
            elif command == "quit":
                if session is None:
                    return None
                if recording:
                    await pause()
                if keeper is not None:
                    keeper.cancel()
                result = await session.end()
                console.finish()
                return joined(result, timeline)
            elif command:
                console.note(f"{command!r} does nothing now; {HELP}")
            if session is not None and not session.open:
                await session.close()
                if not ended_early():
                    raise ClientError("; ".join(session.result.problems()) or "the server closed the session")
                for piece in await reopen():  # closed while paused: the unsent audio goes now
                    await send(piece)
        return joined(session.result, timeline) if session else None
    finally:
        for task in (sender, keeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.stop()
            stream.close()
        if session is not None:
            await session.close()
