"""Commands that need no server: `stt` (a file through the same engine) and `tts` (espeak-ng)."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import soxr
from numpy.typing import NDArray

from real_time_audio.audio.pcm import MODEL_SAMPLE_RATE
from rta_client.session import ClientError

ESPEAK = "espeak-ng"
CHUNK_S = 1.0


def synthesize(text: str, voice: str = "en", words_per_minute: int = 165) -> tuple[NDArray[np.float32], int]:
    """Speak `text` with espeak-ng; returns 16 kHz mono float32 samples and their rate."""
    binary = shutil.which(ESPEAK) or shutil.which("espeak")
    if binary is None:
        raise ClientError("tts needs espeak-ng: install it (apt-get install espeak-ng) and try again", 5)
    if not text.strip():
        raise ClientError("tts: nothing to say (the text is empty)", 2)
    completed = subprocess.run(
        [binary, "-v", voice, "-s", str(words_per_minute), "--stdout", text], capture_output=True, check=False
    )
    if completed.returncode != 0 or not completed.stdout:
        raise ClientError(f"espeak-ng failed: {completed.stderr.decode(errors='replace').strip()}", 5)
    samples, rate = soundfile.read(io.BytesIO(completed.stdout), dtype="float32")
    if samples.ndim > 1:
        samples = samples.mean(axis=1)
    audio = np.asarray(soxr.resample(samples, rate, MODEL_SAMPLE_RATE), dtype=np.float32)
    return audio, MODEL_SAMPLE_RATE


def transcribe_offline(
    samples: NDArray[np.float32], settings: Any, language: str | None, task: str
) -> list[dict[str, Any]]:
    """Run audio through the server's own pipeline (voice activity, the streaming policy, the
    engine) with no network in between; returns final transcriptions shaped like the server's."""
    from real_time_audio.audio.vad import SileroScorer
    from real_time_audio.messages import SessionConfig
    from real_time_audio.pipeline import (
        RecordingTranscription,
        SessionPipeline,
        transcribe_ready_blocking,
        transcription_message,
    )
    from real_time_audio.whisper.backend import load_engine

    engine = load_engine(settings)
    engine.start()
    try:
        scorer = SileroScorer.shared() if settings.vad != "off" else None
        config = SessionConfig().model_copy(update={"language": language, "task": task, "interim_results": False})
        job = RecordingTranscription(SessionPipeline(settings, None, config, scorer, session_id="stt"))
        step = int(CHUNK_S * MODEL_SAMPLE_RATE)
        for start in range(0, len(samples), step):
            job.add(samples[start : start + step])
            transcribe_ready_blocking(job, engine)
        job.end()
        transcribe_ready_blocking(job, engine)
        return [transcription_message(final.segment).model_dump(exclude={"lag"}) for final in job.finals]
    finally:
        engine.stop()


def read_for_stt(path: Path, encoding: str | None, sample_rate: int, channels: int) -> NDArray[np.float32]:
    from real_time_audio.audio.files import load_audio

    if not path.is_file():
        raise ClientError(f"{path}: no such file", 2)
    try:
        return load_audio(path, encoding, sample_rate, channels)
    except ValueError as exc:
        raise ClientError(str(exc), 2) from None
