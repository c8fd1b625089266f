"""The per-session record: a WAV that stays valid while it grows, transcript lines, metadata."""

from __future__ import annotations

import hashlib
import json
import wave
from pathlib import Path

import numpy as np
import soundfile as sf

from real_time_audio.storage import SessionRecorder


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
