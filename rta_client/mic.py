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
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from rta_client.console import Console
from rta_client.session import ClientError, ClientOptions, LiveSession, SessionResult

COMMANDS = ("start", "stop", "resume", "quit")
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
) -> SessionResult | None:
    """Run the command loop; returns the session's result, or None if it was never started."""
    options.encoding, options.sample_rate, options.channels = "pcm_s16le", sample_rate, 1
    console = console or Console()
    loop = asyncio.get_running_loop()
    captured: asyncio.Queue[bytes] = asyncio.Queue()
    stream: InputStream | None = None
    session: LiveSession | None = None
    sender: asyncio.Task[None] | None = None
    keeper: asyncio.Task[None] | None = None
    recording = False

    def on_audio(data: bytes) -> None:  # called on PortAudio's thread
        loop.call_soon_threadsafe(captured.put_nowait, data)

    async def send_captured() -> None:
        assert session is not None
        while True:
            data = await captured.get()
            try:
                await session.send_audio(data)
            finally:
                captured.task_done()

    async def keep_alive() -> None:
        assert session is not None
        while True:
            await asyncio.sleep(keepalive_s)
            if not recording:
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
                session = LiveSession(options, console.on_message)
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
                return result
            elif command:
                console.note(f"{command!r} does nothing now; {HELP}")
            if session is not None and not session.open:
                raise ClientError("; ".join(session.result.problems()) or "the server closed the session")
        return session.result if session else None
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
