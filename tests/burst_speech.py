"""Test doubles for the streaming policy: synthetic "speech" whose words are tone bursts, a
transcriber that hears them, and an energy scorer for the voice-activity detector.

Each word of VOCABULARY is a tone burst at its own frequency. `BurstTranscriber` implements the
engine's `Backend` interface: it "hears" every burst that lies fully inside the decoded window,
with exact timestamps, and, like a real model, is unsure of a word that ends right at the edge of
the audio it was given: that word comes out different on every call. It is a test double only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI
from numpy.typing import NDArray

from real_time_audio.config import Settings
from real_time_audio.service import TranscriptionEngine, TranscriptionRequest, TranscriptionResult, Word

RATE = 16000
BASE_HZ = 300.0
STEP_HZ = 50.0
VOCABULARY = [f"w{index:02d}" for index in range(100)]
AMPLITUDE = 0.3
ANALYSIS_S = 0.01  # the transcriber's energy frames
UNSURE_S = 0.15  # a word ending this close to the window's end is misheard


@dataclass(slots=True, frozen=True)
class SpokenWord:
    text: str
    start: float
    end: float


def burst(word_index: int, duration_s: float) -> NDArray[np.float32]:
    """One word: a tone with 5 ms raised-cosine edges."""
    n = int(duration_s * RATE)
    t = np.arange(n) / RATE
    tone = AMPLITUDE * np.sin(2 * np.pi * (BASE_HZ + STEP_HZ * word_index) * t)
    edge = min(n // 2, int(0.005 * RATE))
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(edge) / edge)
    tone[:edge] *= ramp
    tone[n - edge :] *= ramp[::-1]
    return tone.astype(np.float32)


def speech_block(
    seed: int, seconds: float, long_utterance_s: float = 0.0
) -> tuple[NDArray[np.float32], list[SpokenWord]]:
    """`seconds` of utterances separated by random pauses; optionally one long utterance first."""
    rng = np.random.default_rng(seed)
    pieces: list[NDArray[np.float32]] = []
    words: list[SpokenWord] = []
    position = 0

    def add(samples: NDArray[np.float32]) -> None:
        nonlocal position
        pieces.append(samples)
        position += len(samples)

    def utterance(length_s: float) -> None:
        end = position + int(length_s * RATE)
        while position < end:
            index = int(rng.integers(len(VOCABULARY)))
            samples = burst(index, float(rng.uniform(0.15, 0.45)))
            words.append(SpokenWord(VOCABULARY[index], position / RATE, (position + len(samples)) / RATE))
            add(samples)
            add(np.zeros(int(rng.uniform(0.08, 0.25) * RATE), dtype=np.float32))

    add(np.zeros(int(0.5 * RATE), dtype=np.float32))
    if long_utterance_s:
        utterance(long_utterance_s)
        add(np.zeros(int(rng.uniform(0.7, 3.0) * RATE), dtype=np.float32))
    total = int(seconds * RATE)
    while position < total - 6 * RATE:
        utterance(float(rng.uniform(0.5, 5.0)))
        add(np.zeros(int(rng.uniform(0.7, 3.0) * RATE), dtype=np.float32))
    add(np.zeros(max(0, total - position), dtype=np.float32))
    return np.concatenate(pieces)[:total], words


class BurstTranscriber:
    """A `Backend` that hears tone-burst words; see the module docstring."""

    model_id = "burst-transcriber"
    device = "cpu"
    languages: frozenset[str] | None = frozenset({"en"})

    def __init__(self) -> None:
        self.calls = 0
        self.window_seconds: list[float] = []

    def transcribe_batch(self, requests: Sequence[TranscriptionRequest]) -> list[TranscriptionResult]:
        return [self._hear(r.audio, len((r.prefix or "").split())) for r in requests]

    def _hear(self, audio: NDArray[np.float32], forced: int = 0) -> TranscriptionResult:
        """The words heard; like a model made to begin with `forced` committed words, only what follows them."""
        self.calls += 1
        self.window_seconds.append(len(audio) / RATE)
        step = int(ANALYSIS_S * RATE)
        frames = len(audio) // step
        if frames == 0:
            return TranscriptionResult(text="", language="en", tokens=0)
        energy = np.sqrt(np.mean(audio[: frames * step].reshape(frames, step) ** 2, axis=1))
        loud = energy > AMPLITUDE / 10
        words: list[Word] = []
        index = 0
        while index < frames:
            if not loud[index]:
                index += 1
                continue
            first = index
            while index < frames and loud[index]:
                index += 1
            if first == 0 or index >= frames - 1:
                continue  # cut by the window's edge: not heard
            samples = audio[first * step : index * step]
            spectrum = np.abs(np.fft.rfft(samples))
            peak_hz = np.argmax(spectrum) * RATE / len(samples)
            word = VOCABULARY[round((peak_hz - BASE_HZ) / STEP_HZ)]
            words.append(Word(word, first * ANALYSIS_S, index * ANALYSIS_S))
        duration = len(audio) / RATE
        if words and duration - words[-1].end < UNSURE_S:
            last = words[-1]
            words[-1] = Word(f"{last.text}~{self.calls}", last.start, last.end)
        words = words[forced:]
        text = " ".join(w.text for w in words)
        return TranscriptionResult(
            text=text,
            language="en",
            tokens=len(words),
            words=words,
            avg_logprob=-0.2,
            no_speech_prob=0.01,
            after_prefix=forced > 0,
        )


class EnergyScorer:
    """A `FrameScorer` for tone bursts: a frame is speech when it is loud."""

    def new_state(self) -> None:
        return None

    def score(self, frames: NDArray[np.float32], state: None) -> tuple[NDArray[np.float32], None]:
        energy = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
        return (energy > AMPLITUDE / 10).astype(np.float32), None


def burst_app(settings: Settings) -> FastAPI:
    """The real application with the burst transcriber as its model and energy as its VAD."""
    from main import create_app

    model = BurstTranscriber()

    def engine_factory(_: Settings) -> TranscriptionEngine:
        return TranscriptionEngine(lambda: model, warmup=False, batch_wait_ms=0)

    return create_app(settings, engine_factory=engine_factory, vad_factory=EnergyScorer)
