"""The command-line client against a real uvicorn server: files, formats, errors, microphone, load."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from numpy.typing import NDArray

from real_time_audio.audio.files import encode, load_audio
from real_time_audio.config import Settings
from rta_client.__main__ import main
from rta_client.formats import render
from rta_client.load import print_table, run_load
from rta_client.mic import MicrophoneUnavailable, run_microphone, sounddevice_stream
from rta_client.session import ClientOptions
from tests.burst_speech import SpokenWord, burst_app, speech_block
from tests.conftest import LiveServer, free_port, needs_espeak, pcm16, speech_like

pytestmark = pytest.mark.slow  # integration: real servers, sessions or models

FINALS = [
    {"segment_id": 2, "is_final": True, "text": "second part", "start": 3.5, "end": 4.25, "language": "en"},
    {"segment_id": 1, "is_final": True, "text": "first", "start": 0.0, "end": 1.5, "language": "en", "words": []},
    {"segment_id": 3, "is_final": True, "text": " ", "start": 5.0, "end": 5.1, "language": "en"},
    {"segment_id": 4, "is_final": True, "text": "an hour in", "start": 3723.5, "end": 3724.0, "language": "en"},
]


@pytest.fixture
def burst_server(make_settings: Callable[..., Settings]) -> Iterator[LiveServer]:
    with LiveServer(burst_app(make_settings(vad="silero", partial_interval_ms=300))) as server:
        yield server


@pytest.fixture(scope="module")
def burst_speech() -> tuple[NDArray[np.float32], list[SpokenWord]]:
    return speech_block(seed=31, seconds=24.0)


def words_of(finals: list[dict[str, Any]]) -> list[str]:
    return [w["word"] for f in finals for w in f.get("words", [])]


def test_transcript_formats_are_exact() -> None:
    assert render(FINALS, "text") == "first second part an hour in\n"
    assert render(FINALS, "srt") == (
        "1\n00:00:00,000 --> 00:00:01,500\nfirst\n\n"
        "2\n00:00:03,500 --> 00:00:04,250\nsecond part\n\n"
        "3\n01:02:03,500 --> 01:02:04,000\nan hour in\n"
    )
    assert render(FINALS, "vtt") == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nfirst\n\n"
        "00:00:03.500 --> 00:00:04.250\nsecond part\n\n"
        "01:02:03.500 --> 01:02:04.000\nan hour in\n"
    )
    document = json.loads(render(FINALS, "json", {"session_id": "abc"}))
    assert document["text"] == "first second part an hour in"
    assert [s["segment_id"] for s in document["segments"]] == [1, 2, 4]
    assert document["session"] == {"session_id": "abc"}


@pytest.mark.parametrize("encoding", ["webm", "mp4", "pcm_s16le"])
def test_stream_command_writes_the_transcript_and_checks_the_recording(
    encoding: str,
    burst_server: LiveServer,
    burst_speech: tuple[NDArray[np.float32], list[SpokenWord]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    audio, spoken = burst_speech
    source = tmp_path / ("speech.raw" if encoding == "pcm_s16le" else f"speech.{encoding}")
    source.write_bytes(encode(audio, 16000, encoding))
    out = tmp_path / "transcript.json"
    code = main(["stream", str(source), "--uri", burst_server.url, "--chunk-size", "3000", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    document = json.loads(out.read_text())
    assert words_of(document["segments"]) == [w.text for w in spoken]
    assert document["text"] == " ".join(w.text for w in spoken)
    recording = document["session"]["recording"]
    assert recording["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert f"recording sha256 matches the {source.stat().st_size} bytes sent" in captured.err
    assert captured.out.count("\n") == len(document["segments"])  # one line per final (stdout is not a terminal)


def test_realtime_pacing_takes_as_long_as_the_audio(burst_server: LiveServer, tmp_path: Path) -> None:
    audio, _ = speech_block(seed=4, seconds=3.0)
    source = tmp_path / "short.ogg"
    source.write_bytes(encode(audio, 16000, "ogg"))
    started = time.monotonic()
    assert main(["stream", str(source), "--uri", burst_server.url, "--realtime", "--chunk-size", "1000", "-q"]) == 0
    assert time.monotonic() - started >= 2.8  # paced: never faster than the audio plays


def test_format_to_stdout_keeps_stdout_for_the_transcript(
    burst_server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    audio, spoken = speech_block(seed=6, seconds=8.0)
    source = tmp_path / "speech.flac"
    source.write_bytes(encode(audio, 16000, "flac"))
    assert main(["stream", str(source), "--uri", burst_server.url, "-f", "text"]) == 0
    assert capsys.readouterr().out == " ".join(w.text for w in spoken) + "\n"


def test_errors_exit_non_zero_with_a_clear_message(
    burst_server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stream", str(tmp_path / "missing.wav"), "--uri", burst_server.url]) == 2
    assert "missing.wav: no such file" in capsys.readouterr().err

    port = free_port()
    source = tmp_path / "speech.wav"
    source.write_bytes(encode(speech_block(seed=1, seconds=2.0)[0], 16000, "wav"))
    assert main(["stream", str(source), "--uri", f"ws://127.0.0.1:{port}/ws/transcribe"]) == 3
    assert f"error: cannot connect to ws://127.0.0.1:{port}/ws/transcribe" in capsys.readouterr().err

    junk = tmp_path / "junk.webm"
    junk.write_bytes(b"this is not a webm file at all" * 10)
    assert main(["stream", str(junk), "--uri", burst_server.url, "-q"]) == 1
    err = capsys.readouterr().err
    assert "server error bad_audio: the stream does not look like webm" in err

    unknown = tmp_path / "notes.txt"
    unknown.write_text("hello")
    assert main(["stream", str(unknown), "--uri", burst_server.url]) == 2
    assert "unknown audio format" in capsys.readouterr().err


class FakeMicrophone:
    """An injected input stream: delivers `audio` in blocks from its own thread while started, then
    silence once the audio is used up, like a sound card calling back."""

    instances: ClassVar[list[FakeMicrophone]] = []

    def __init__(
        self, audio: bytes, rate: int, blocksize: int, on_audio: Callable[[bytes], None], speed: float = 20
    ) -> None:
        self.audio, self.block_bytes, self.on_audio = audio, blocksize * 2, on_audio
        self.position = 0
        self.delivered = bytearray()
        self.block_s = blocksize / rate / speed  # by default twenty times faster than real time
        self._running = threading.Event()
        self._thread: threading.Thread | None = None
        self.closed = False
        FakeMicrophone.instances.append(self)

    def start(self) -> None:
        self._running.set()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._running.is_set():
            block = self.audio[self.position : self.position + self.block_bytes]
            self.position += len(block)
            block += bytes(self.block_bytes - len(block))
            self.delivered += block
            self.on_audio(block)
            time.sleep(self.block_s)

    def stop(self) -> None:
        self._running.clear()
        if self._thread is not None:
            self._thread.join()

    def close(self) -> None:
        self.closed = True


def test_microphone_mode_start_stop_resume_quit(
    burst_server: LiveServer, burst_speech: tuple[NDArray[np.float32], list[SpokenWord]]
) -> None:
    audio, spoken = burst_speech
    data = pcm16(audio)
    FakeMicrophone.instances.clear()
    # Stop inside a pause between utterances, so that no word is cut in two by the stop.
    pause_start = next(a.end for a, b in itertools.pairwise(spoken) if a.end > 8 and b.start - a.end > 1.0)
    stop_at = int((pause_start + 0.3) * 16000) * 2

    async def commands() -> AsyncIterator[str]:
        yield "start"
        mic = FakeMicrophone.instances[0]
        while mic.position < stop_at:
            await asyncio.sleep(0.02)
        yield "stop"
        yield "resume"
        while mic.position < len(data):
            await asyncio.sleep(0.02)
        yield "quit"

    def factory(rate: int, channels: int, blocksize: int, on_audio: Callable[[bytes], None]) -> FakeMicrophone:
        assert (rate, channels) == (16000, 1)
        return FakeMicrophone(data, rate, blocksize, on_audio)

    result = asyncio.run(
        run_microphone(ClientOptions(uri=burst_server.url), commands(), stream_factory=factory, keepalive_s=0.05)
    )
    assert result is not None and result.ok, result.problems() if result else None
    mic = FakeMicrophone.instances[0]
    assert mic.closed
    assert result.sent_bytes == len(mic.delivered)  # every captured block was sent, nothing after stop
    assert result.completed is not None
    assert result.completed["recording"]["sha256"] == hashlib.sha256(bytes(mic.delivered)).hexdigest()
    statuses = [m.get("status") for m in result.messages if m["type"] == "status"]
    assert statuses == ["connected", "flushed", "flushed", "completed"]  # stop flushes; quit stops, then ends
    assert words_of(result.finals) == [w.text for w in spoken]


def test_microphone_reconnects_after_a_restart_without_losing_a_word(
    make_settings: Callable[..., Settings], burst_speech: tuple[NDArray[np.float32], list[SpokenWord]]
) -> None:
    """With reconnecting on, a server restart in mid-speech costs the microphone mode nothing: it
    resends from the resume point, and the finals of both sessions are every word once."""
    from real_time_audio.ops.drain import drain

    audio, spoken = burst_speech
    data = pcm16(audio)
    FakeMicrophone.instances.clear()
    settings = make_settings(vad="silero", partial_interval_ms=300)
    app = burst_app(settings)
    state = app.state.server
    with LiveServer(app) as server:

        async def commands() -> AsyncIterator[str]:
            yield "start"
            mic = FakeMicrophone.instances[0]
            while mic.position < len(data) // 3:
                await asyncio.sleep(0.01)
            drained = asyncio.run_coroutine_threadsafe(drain(state, 30), server.server_loop)
            assert await asyncio.wrap_future(drained) == 0
            await asyncio.sleep(0.3)  # refused meanwhile: the client tries again
            state.draining = False  # the server is back
            while mic.position < len(data):
                await asyncio.sleep(0.02)
            yield "quit"

        def factory(rate: int, channels: int, blocksize: int, on_audio: Callable[[bytes], None]) -> FakeMicrophone:
            return FakeMicrophone(data, rate, blocksize, on_audio, speed=2)  # the restart comes in mid-speech

        options = ClientOptions(uri=server.url)
        result = asyncio.run(
            run_microphone(options, commands(), stream_factory=factory, keepalive_s=0.05, reconnect_timeout_s=30)
        )
    assert result is not None and result.ok, result.problems() if result else None
    assert words_of(result.finals) == [w.text for w in spoken]
    assert [f["segment_id"] for f in result.finals] == list(range(len(result.finals)))
    records = sorted(
        (json.loads(p.read_text()) for p in settings.audio_storage_dir.glob("*/session.json")),
        key=lambda meta: meta["started_at"],
    )
    assert [r["status"] for r in records] == ["server_shutdown", "completed"]


def test_microphone_unavailable_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Without PortAudio or without an input device, the real factory explains what is missing."""
    with pytest.raises(MicrophoneUnavailable) as info:
        sounddevice_stream(16000, 1, 1600, lambda data: None).close()
    assert "PortAudio" in str(info.value) or "no usable microphone" in str(info.value)
    assert info.value.exit_code == 4


def test_load_runner_reports_every_client(
    burst_server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = []
    for index, encoding in enumerate(["webm", "wav", "mp3"]):
        path = tmp_path / f"client{index}.{encoding}"
        path.write_bytes(encode(speech_block(seed=40 + index, seconds=10.0)[0], 16000, encoding))
        files.append(path)
    reports, wall_s = asyncio.run(run_load(files, 5, ClientOptions(uri=burst_server.url), chunk_size=4000))
    assert [r.client for r in reports] == [1, 2, 3, 4, 5]
    assert [r.file for r in reports] == ["client0.webm", "client1.wav", "client2.mp3", "client0.webm", "client1.wav"]
    assert all(r.ok and r.sha256_ok and r.finals > 0 for r in reports), [r.problem for r in reports]
    assert all(r.first_partial_s is not None and r.final_s is not None for r in reports)
    assert all(abs(r.audio_s - 10.0) < 0.1 for r in reports)
    import io

    table = io.StringIO()
    print_table(reports, wall_s, table)
    lines = table.getvalue().splitlines()
    assert len(lines) == 7 and lines[-1].startswith("summary: 5/5 ok, 5/5 sha256 match")


def test_stt_gives_what_the_server_gives(
    make_settings: Callable[..., Settings], checkpoint_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The offline command runs the server's own pipeline: on the same file, with partials out of
    the way, its segments are exactly the finals a server session sends."""
    from main import create_app

    audio = speech_like(seed=2, duration_s=6.0)
    source = tmp_path / "speech.mp3"
    source.write_bytes(encode(audio, 16000, "mp3"))
    served = tmp_path / "served.json"
    with LiveServer(create_app(make_settings(partial_interval_ms=3_600_000))) as server:
        assert main(["stream", str(source), "--uri", server.url, "--language", "en", "-q", "-o", str(served)]) == 0
    for name, value in {"TRANSCRIPTION_MODEL_ID": str(checkpoint_dir), "VAD": "off", "DEVICE": "cpu"}.items():
        monkeypatch.setenv(name, value)
    offline = tmp_path / "offline.json"
    assert main(["stt", str(source), "--language", "en", "-o", str(offline)]) == 0
    expected, got = json.loads(served.read_text()), json.loads(offline.read_text())
    assert got["text"] and got["text"] == expected["text"]
    assert got["segments"] == expected["segments"]


@needs_espeak
def test_tts_writes_speech_in_the_format_of_the_suffix(tmp_path: Path) -> None:
    out = tmp_path / "hello.webm"
    assert main(["tts", "hello there, this is a test", "-o", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x1a\x45\xdf\xa3"
    speech = load_audio(out)
    assert 1.0 < len(speech) / 16000 < 4.0
    assert float(np.sqrt(np.mean(speech**2))) > 0.01


def test_tts_without_espeak_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert main(["tts", "hello", "-o", str(tmp_path / "x.wav")]) == 5
    assert "tts needs espeak-ng: install it (apt-get install espeak-ng)" in capsys.readouterr().err


def test_the_installed_command_runs(tmp_path: Path) -> None:
    """`rta-client` is installed with the project (make install) and is the same program."""
    import subprocess
    import sys

    command = Path(sys.executable).parent / "rta-client"
    if not command.exists():
        pytest.skip("the project is not installed in this environment (make install installs it)")
    done = subprocess.run([str(command), "stream", str(tmp_path / "nothing.wav")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == f"error: {tmp_path / 'nothing.wav'}: no such file\n"
    module = subprocess.run(
        [sys.executable, "-m", "rta_client", "stream", str(tmp_path / "nothing.wav")],
        capture_output=True,
        text=True,
    )
    assert (module.returncode, module.stderr) == (done.returncode, done.stderr)


def test_stream_reconnect_goes_on_after_a_restart_without_losing_a_word(
    make_settings: Callable[..., Settings], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--reconnect: the server drains in mid-stream (finals, shutting_down, 1001) and refuses new
    sessions until it is back; the client retries, resends from the resume point, and its
    transcript is every word exactly once, on one timeline."""
    from real_time_audio.ops.drain import drain

    audio, spoken = speech_block(seed=8, seconds=10.0)
    source = tmp_path / "speech.raw"
    source.write_bytes(pcm16(audio))
    out = tmp_path / "transcript.json"
    settings = make_settings(vad="silero", partial_interval_ms=300)
    app = burst_app(settings)
    state = app.state.server
    with LiveServer(app) as server:
        argv = ["stream", str(source), "--encoding", "pcm_s16le", "--realtime", "--reconnect", "--uri", server.url]
        codes: list[int] = []
        client = threading.Thread(target=lambda: codes.append(main([*argv, "--chunk-size", "1600", "-o", str(out)])))
        client.start()
        deadline = time.monotonic() + 30
        while not any(s.pipeline and s.pipeline.finals for s in list(state.sessions.values())):
            assert time.monotonic() < deadline and client.is_alive()
            time.sleep(0.05)
        time.sleep(0.7)  # into the next words
        drained = asyncio.run_coroutine_threadsafe(drain(state, 30), server.server_loop)
        assert drained.result(30) == 0
        time.sleep(0.5)  # still refusing: the client is told 1013 and tries again
        state.draining = False  # the server is back
        client.join(60)
    captured = capsys.readouterr()
    assert codes == [0], captured.err
    assert "going on from" in captured.err and "1001 server shutting down" in captured.err
    document = json.loads(out.read_text())
    assert words_of(document["segments"]) == [w.text for w in spoken]
    assert [s["segment_id"] for s in document["segments"]] == list(range(len(document["segments"])))
    starts = [w["start"] for s in document["segments"] for w in s["words"]]
    assert starts == sorted(starts) and abs(starts[-1] - spoken[-1].start) < 0.5  # one timeline
    records = sorted(
        (json.loads(p.read_text()) for p in settings.audio_storage_dir.glob("*/session.json")),
        key=lambda meta: meta["started_at"],
    )
    assert [r["status"] for r in records] == ["server_shutdown", "completed"]
    # The second session heard its first words with the text before them as its prompt.
    assert "prompt" not in records[0]["config"] and records[1]["config"]["prompt"] in document["text"]
    first, second = (settings.audio_storage_dir / r["session_id"] / "audio.wav" for r in records)
    sent = source.read_bytes()
    head, tail = first.read_bytes()[44:], second.read_bytes()[44:]
    assert sent.startswith(head) and sent.endswith(tail) and len(head) + len(tail) >= len(sent)
