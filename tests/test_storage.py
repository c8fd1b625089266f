"""The per-session record: a WAV that stays valid while it grows, transcript lines, metadata."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import wave
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import soundfile as sf

from real_time_audio.storage.recorder import SessionRecorder, recover_interrupted


def test_wav_header_is_valid_while_growing(tmp_path: Path) -> None:
    """After each one-second flush the header covers exactly the bytes on disk."""
    recorder = SessionRecorder(tmp_path, "s1", {"model": "m"})
    recorder.FLUSH_INTERVAL_S = 0.0  # flush on every write, to observe each step
    data = b""
    for i in range(5):
        frame = np.full(800, i * 100, dtype="<i2").tobytes()
        recorder.write_audio(frame, "pcm_s16le", 16000, 1)
        data += frame
        with wave.open(str(recorder.audio_path)) as wav:
            assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
            assert wav.readframes(wav.getnframes()) == data
    recorder.close("completed")


def test_float_stereo_wav_round_trips(tmp_path: Path) -> None:
    """pcm_f32le audio is stored as IEEE-float WAV with the client's rate and channels."""
    recorder = SessionRecorder(tmp_path, "s2", {})
    samples = np.random.default_rng(0).uniform(-1, 1, (1000, 2)).astype("<f4")
    recorder.write_audio(samples.tobytes(), "pcm_f32le", 44100, 2)
    recorder.close("completed")
    read, rate = sf.read(recorder.audio_path, dtype="float32")
    assert rate == 44100
    np.testing.assert_array_equal(read, samples)


def test_metadata_and_transcript(tmp_path: Path) -> None:
    """session.json carries the byte count and SHA-256 of exactly the received bytes; finals go to JSONL."""
    recorder = SessionRecorder(tmp_path, "s3", {"model": "tiny", "device": "cpu"})
    assert json.loads((tmp_path / "s3" / "session.json").read_text())["status"] == "active"
    chunks = [b"\x01\x02" * 10, b"\x03\x04" * 7]
    for chunk in chunks:
        recorder.write_audio(chunk, "pcm_s16le", 16000, 1)
    recorder.append_final({"segment_id": 0, "text": "hello"})
    recorder.append_final({"segment_id": 1, "text": "wörld"})
    recorder.close("completed", segments=2)
    meta = json.loads((tmp_path / "s3" / "session.json").read_text())
    assert meta["status"] == "completed" and meta["segments"] == 2 and meta["model"] == "tiny"
    assert meta["bytes"] == 34
    assert meta["sha256"] == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert meta["ended_at"] >= meta["started_at"]
    lines = (tmp_path / "s3" / "transcript.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["text"] for line in lines] == ["hello", "wörld"]
    assert recorder.closed
    recorder.close("completed")  # a second close changes nothing


# -- recovery after a crash -----------------------------------------------------------------------

CRASHING_WRITER = """
import os, signal, sys
from pathlib import Path
from real_time_audio.storage.recorder import SessionRecorder, recover_interrupted

root, encoding, rate, channels = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = {"encoding": encoding, "sample_rate": rate, "channels": channels}
recorder = SessionRecorder(root, "crashed", {"config": config})
recorder.FLUSH_INTERVAL_S = 0.0  # everything below reaches the OS ...
for size in sys.argv[5:]:
    recorder.write_audio(bytes(range(256)) * (int(size) // 256) + bytes(int(size) % 256), encoding, rate, channels)
recorder.FLUSH_INTERVAL_S = 3600.0
recorder.write_audio(b"lost" * 100, encoding, rate, channels)  # ... except this, still in Python's buffer
os.kill(os.getpid(), signal.SIGKILL)
"""


def crash_while_recording(root: Path, encoding: str, rate: int, channels: int, sizes: list[int]) -> bytes:
    """Record frames in a child process that is then killed with SIGKILL; returns what reached the OS."""
    result = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, str(root), encoding, str(rate), str(channels), *map(str, sizes)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    return b"".join(bytes(range(256)) * (size // 256) + bytes(size % 256) for size in sizes)


def test_session_json_names_the_server_process(tmp_path: Path) -> None:
    """session.json records the pid and host of the process writing it, from the start."""
    recorder = SessionRecorder(tmp_path, "s4", {})
    meta = json.loads((tmp_path / "s4" / "session.json").read_text())
    assert meta["server"] == {"pid": os.getpid(), "host": socket.gethostname()}
    recorder.close("completed")


def test_recovery_repairs_a_pcm_record_whose_process_died(tmp_path: Path) -> None:
    """A killed writer's WAV is cut to whole frames with a matching header; bytes, hash and status follow."""
    # 16-bit stereo: 4-byte frames; the last frame stops inside a sample pair (legal mid-stream)
    on_os = crash_while_recording(tmp_path, "pcm_s16le", 48000, 2, [4000, 1000, 6])
    folder = tmp_path / "crashed"
    wav_mtime = (folder / "audio.wav").stat().st_mtime
    assert json.loads((folder / "session.json").read_text())["status"] == "active"

    assert recover_interrupted(tmp_path) == ["crashed"]

    kept = on_os[: len(on_os) - len(on_os) % 4]
    assert len(kept) == 5004
    info = sf.info(str(folder / "audio.wav"))
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (48000, 2, "PCM_16", len(kept) // 4)
    with wave.open(str(folder / "audio.wav")) as wav:
        assert wav.readframes(wav.getnframes()) == kept
    meta = json.loads((folder / "session.json").read_text())
    assert (meta["status"], meta["bytes"], meta["sha256"]) == ("interrupted", 5004, hashlib.sha256(kept).hexdigest())
    assert meta["ended_at"] == datetime.fromtimestamp(wav_mtime, UTC).isoformat(timespec="milliseconds")
    assert meta["duration"] == round(1251 / 48000, 3) and meta["audio_file"] == "audio.wav"
    assert recover_interrupted(tmp_path) == []  # repaired once; now "interrupted", not "active"


def test_recovery_keeps_a_container_stream_as_it_is(tmp_path: Path) -> None:
    """A container record keeps every byte on disk; the hash covers the raw file."""
    on_os = crash_while_recording(tmp_path, "webm", 16000, 1, [1000, 333])
    assert recover_interrupted(tmp_path) == ["crashed"]
    folder = tmp_path / "crashed"
    assert (folder / "audio.webm").read_bytes() == on_os
    meta = json.loads((folder / "session.json").read_text())
    assert (meta["status"], meta["audio_file"]) == ("interrupted", "audio.webm")
    assert (meta["bytes"], meta["sha256"]) == (1333, hashlib.sha256(on_os).hexdigest())


def test_recovery_leaves_live_foreign_and_finished_sessions_alone(tmp_path: Path) -> None:
    """Only records of dead processes on this host are touched: not a live one, another host's, or a closed one."""
    crash_while_recording(tmp_path, "pcm_s16le", 16000, 1, [640])
    foreign = tmp_path / "crashed" / "session.json"
    meta = json.loads(foreign.read_text())
    meta["server"]["host"] = socket.gethostname() + "-elsewhere"
    foreign.write_text(json.dumps(meta))
    live = SessionRecorder(tmp_path, "live", {})  # this process: alive
    live.write_audio(b"\0\0" * 100, "pcm_s16le", 16000, 1)
    finished = SessionRecorder(tmp_path, "finished", {})
    finished.close("completed")
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    assert recover_interrupted(tmp_path) == []

    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
    live.close("completed")
