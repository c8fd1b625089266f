"""The session pipeline on its own: no server, no socket. Bytes go in; the record, the decoded
audio, the voice activity and the requests and finals that come out are checked exactly."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from real_time_audio.audio.vad import VoiceActivityDetector
from real_time_audio.config import Settings, load_settings
from real_time_audio.messages import SessionConfig
from real_time_audio.pipeline import (
    RecordingTranscription,
    SessionPipeline,
    final_record,
    transcribe_ready_blocking,
)
from real_time_audio.service import TranscriptionEngine
from real_time_audio.storage.recorder import SessionRecorder
from real_time_audio.streaming.policy import Window
from tests import hostile_media
from tests.burst_speech import BurstTranscriber, EnergyScorer, speech_block
from tests.conftest import pcm16

SESSION = "0123456789abcdef0123456789abcdef"


def settings_in(tmp_path: Path, **overrides: object) -> Settings:
    return load_settings(transcription_model_id="unused", audio_storage_dir=tmp_path, **overrides)


def pipeline_in(tmp_path: Path, config: SessionConfig | None = None, record: bool = True) -> SessionPipeline:
    settings = settings_in(tmp_path, vad="silero")
    config = config or SessionConfig()
    recorder = SessionRecorder(tmp_path, SESSION, {"config": config.wire()}) if record else None
    return SessionPipeline(settings, recorder, config, EnergyScorer(), session_id=SESSION)


def test_bytes_are_kept_decoded_and_detected_as_they_arrive(tmp_path: Path) -> None:
    """PCM in uneven frames: the record holds every byte, the samples are the frames', and the
    voice activity is what one detector finds over the whole audio at once."""
    audio, _ = speech_block(seed=4, seconds=8.0)
    data = pcm16(audio)
    pipeline = pipeline_in(tmp_path)
    cuts = [0, 1000, 1001, 40_000, 40_002, 150_000, len(data)]
    pieces = [pipeline.receive(data[a:b]) for a, b in itertools.pairwise(cuts)]
    samples = np.concatenate([p.samples for p in pieces])
    whole = VoiceActivityDetector.from_settings(EnergyScorer(), pipeline.settings)
    assert np.array_equal(samples, np.frombuffer(data, "<i2").astype(np.float32) / 32768)
    assert [e for p in pieces for e in p.events] == whole.process(samples)
    assert all(p.problem is None and p.storage is None for p in pieces)
    pipeline.release("completed")
    stored = (tmp_path / SESSION / "audio.wav").read_bytes()
    assert stored[44:] == data
    meta = json.loads((tmp_path / SESSION / "session.json").read_text())
    assert (meta["status"], meta["bytes"], meta["duration"]) == ("completed", len(data), 8.0)
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()


def test_nothing_happens_after_release(tmp_path: Path) -> None:
    """A thread that outlives the session finds the record closed and the decoder stopped."""
    pipeline = pipeline_in(tmp_path)
    pipeline.receive(pcm16(np.zeros(1600, dtype=np.float32)))
    pipeline.release("disconnected")
    late = pipeline.receive(b"\x01\x00" * 800)
    assert (len(late.samples), late.events, late.problem) == (0, [], None)
    assert (len(pipeline.more().samples), len(pipeline.drain(end=True).samples)) == (0, 0)
    assert pipeline.end_speech() == [] and pipeline.record(lambda: 1 / 0) is None
    meta = json.loads((tmp_path / SESSION / "session.json").read_text())
    assert (meta["status"], meta["bytes"]) == ("disconnected", 3200)


def test_a_hostile_stream_is_refused_once_and_then_ignored(tmp_path: Path) -> None:
    """A decompression bomb: the first piece comes, then a fatal problem (flagged once), then nothing."""
    pipeline = pipeline_in(tmp_path, SessionConfig(encoding="flac"))
    bomb = hostile_media.flac_bomb(frames=40)  # 560 bytes declaring 5.5 minutes
    decoded, pieces = pipeline.receive(bomb), 0
    while decoded.problem is None:  # the budget is 10 s plus 1000 bytes of audio per byte: 27.5 s here
        pieces += 1
        assert pieces < 20
        decoded = pipeline.more() if len(decoded.samples) else pipeline.drain(end=True)
    assert decoded.fatal and pipeline.rejected == decoded.problem
    assert "decodes to more audio than any real codec produces" in decoded.problem
    again = pipeline.receive(bomb)
    assert (len(again.samples), again.problem, again.fatal) == (0, None, False)
    pipeline.release("bad_audio")
    assert (tmp_path / SESSION / "audio.flac").read_bytes() == bomb  # what came before the refusal is kept


def test_finals_go_to_the_transcript_as_sent(tmp_path: Path) -> None:
    pipeline = pipeline_in(tmp_path)
    audio, spoken = speech_block(seed=2, seconds=6.0)
    engine = TranscriptionEngine(lambda: BurstTranscriber(), warmup=False, batch_wait_ms=0)  # type: ignore[arg-type]
    engine.start()
    try:
        job = RecordingTranscription(pipeline)
        job.add(audio)
        job.end()
        finals = transcribe_ready_blocking(job, engine)
    finally:
        engine.stop()
    for final in finals:
        assert pipeline.keep_final(final.segment) is None
    pipeline.release("completed")
    lines = (tmp_path / SESSION / "transcript.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [final_record(f.segment) for f in finals]
    assert " ".join(f.segment.text for f in finals) == " ".join(w.text for w in spoken)
    assert pipeline.finals == [f.segment.text for f in finals]


@pytest.mark.parametrize("piece_s", [0.1, 0.77, 3.0])
def test_a_recording_does_not_depend_on_how_it_was_cut(tmp_path: Path, piece_s: float) -> None:
    """A recording is fed to the policy a second at a time, however its audio arrives."""
    audio, spoken = speech_block(seed=9, seconds=20.0, long_utterance_s=8.0)

    def run(step: int, folder: Path) -> list[tuple[str, float, float]]:
        folder.mkdir()
        pipeline = pipeline_in(folder, record=False)
        engine = TranscriptionEngine(lambda: BurstTranscriber(), warmup=False, batch_wait_ms=0)  # type: ignore[arg-type]
        engine.start()
        try:
            job = RecordingTranscription(pipeline)
            for start in range(0, len(audio), step):
                job.add(audio[start : start + step])
                transcribe_ready_blocking(job, engine)
            job.end()
            transcribe_ready_blocking(job, engine)
        finally:
            engine.stop()
        return [(f.segment.text, f.segment.start, f.segment.end) for f in job.finals]

    whole = run(len(audio), tmp_path / "whole")
    assert run(int(piece_s * 16000), tmp_path / "pieces") == whole
    assert " ".join(text for text, _, _ in whole) == " ".join(w.text for w in spoken)


def test_a_request_carries_the_session_prompt_then_the_text_before_the_window(tmp_path: Path) -> None:
    config = SessionConfig(language="en", prompt="Quilter, Stella")
    pipeline = pipeline_in(tmp_path, config, record=False)
    audio = np.ones(16000, dtype=np.float32)
    window = Window(16000, 32000, "partial", audio, "the words before", "already final", 3)
    request = pipeline.request(window, config.prompt)
    assert (request.prompt, request.prefix, request.language, request.task) == (
        "Quilter, Stella the words before",
        "already final",
        "en",
        "transcribe",
    )
    assert (request.is_final, request.session_id, request.audio is audio) == (False, SESSION, True)
    bare = pipeline.request(Window(0, 16000, "final", audio, "", "", 0))
    assert (bare.prompt, bare.prefix, bare.is_final) == (None, None, True)


def test_without_a_record_nothing_is_written(tmp_path: Path) -> None:
    """The offline `stt` command runs the pipeline with no record at all."""
    pipeline = pipeline_in(tmp_path, record=False)
    decoded = pipeline.receive(pcm16(np.zeros(8000, dtype=np.float32)))
    assert (len(decoded.samples), decoded.storage) == (8000, None)
    pipeline.feed(decoded.samples, decoded.events)
    assert pipeline.duration == 0.5
    pipeline.release("completed")
    assert list(tmp_path.iterdir()) == []
