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

from real_time_audio.audio import MODEL_SAMPLE_RATE
from real_time_audio.client.session import ClientError

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
    from real_time_audio.service import TranscriptionEngine, TranscriptionRequest
    from real_time_audio.streaming import UtterancePolicy
    from real_time_audio.vad import SileroScorer, VoiceActivityDetector

    engine = TranscriptionEngine.from_settings(settings)
    engine.start()
    try:
        policy = UtterancePolicy.from_settings(settings, interim_results=False)
        vad = VoiceActivityDetector.from_settings(SileroScorer.shared(), settings) if settings.vad != "off" else None
        step = int(CHUNK_S * MODEL_SAMPLE_RATE)
        for start in range(0, len(samples), step):
            chunk = samples[start : start + step]
            policy.feed(chunk, vad.process(chunk) if vad else [])
        policy.feed(np.zeros(0, dtype=np.float32), vad.finish(len(samples)) if vad else [])
        finals: list[dict[str, Any]] = []
        while (window := policy.next_window(0.0, policy.received)) is not None:
            request = TranscriptionRequest(
                audio=window.audio, language=language, task=task, prompt=window.context or None, is_final=True
            )
            result = engine.submit(request).result()
            for segment in policy.accept(window, result):
                if segment.is_final:
                    finals.append(
                        {
                            "type": "transcription",
                            "segment_id": segment.segment_id,
                            "is_final": True,
                            "text": segment.text,
                            "start": segment.start,
                            "end": segment.end,
                            "language": segment.language,
                            "words": [{"word": w.text, "start": w.start, "end": w.end} for w in segment.words],
                        }
                    )
        return finals
    finally:
        engine.stop()


def read_for_stt(path: Path, encoding: str | None, sample_rate: int, channels: int) -> NDArray[np.float32]:
    from real_time_audio.media import load_audio

    if not path.is_file():
        raise ClientError(f"{path}: no such file", 2)
    try:
        return load_audio(path, encoding, sample_rate, channels)
    except ValueError as exc:
        raise ClientError(str(exc), 2) from None
