"""Voice-activity detection: per-session endpointing on top of a shared Silero VAD model.

The Silero model (shipped inside the `silero-vad` wheel, so nothing is downloaded) scores each
32 ms frame of 16 kHz audio with a speech probability. Its network is stateless apart from one
LSTM state, so a single loaded model serves every session: each session keeps its own LSTM state
and frame context in a `VoiceActivityDetector`. The convolutional front end runs on all the
frames of a chunk at once; only the LSTM steps frame by frame. `BatchingScorer` scores the frames
of every session on one thread, those that wait together in one call.

`VoiceActivityDetector` turns probabilities into `speech_start` / `speech_end` events with
hysteresis, a minimum speech length and a minimum silence length. It takes any `FrameScorer`,
so its state machine is unit-tested with a deterministic scorer.
"""

from __future__ import annotations

import importlib.resources
import math
import queue
import threading
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from real_time_audio.audio.pcm import MODEL_SAMPLE_RATE

if TYPE_CHECKING:
    from real_time_audio.config import Settings

FRAME_SAMPLES = 512  # Silero's frame at 16 kHz (32 ms)
SCORE_FRAMES = 256  # frames scored per model call (8 s of audio), however much arrives at once
CONTEXT_SAMPLES = 64  # samples of the previous frame the model sees before each frame
NEGATIVE_MARGIN = 0.15  # speech continues until the probability drops this far below the threshold
# A pause is silent when no frame of it after its first QUIET_SKIP_FRAMES (where the last word
# fades out) scores VOICE_TRACE or more; otherwise something voice-like (a breath, a whispered or
# released final consonant) is in it, and the utterance's final waits for its whole tail.
QUIET_SKIP_FRAMES = 3
VOICE_TRACE = 0.1


@dataclass(slots=True, frozen=True)
class SpeechEvent:
    """Speech began or ended at `sample` (16 kHz samples from the session start). For an end:
    `voiced`, whether the pause that ended it had a trace of voice in it (see VOICE_TRACE)."""

    kind: Literal["start", "end"]
    sample: int
    voiced: bool = True

    @property
    def at(self) -> float:
        return self.sample / MODEL_SAMPLE_RATE


class FrameScorer(Protocol):
    """Scores whole frames of 16 kHz audio; `state` is the scorer's per-stream memory."""

    def new_state(self) -> Any: ...

    def score(self, frames: NDArray[np.float32], state: Any) -> tuple[NDArray[np.float32], Any]: ...


class SileroScorer:
    """The Silero VAD network with its recurrent state held by the caller (thread-safe)."""

    _shared: SileroScorer | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        import torch

        threads = torch.get_num_threads()
        from silero_vad.utils_vad import init_jit_model  # importing silero sets torch to one thread

        torch.set_num_threads(threads)
        self._torch = torch
        model_file = importlib.resources.files("silero_vad.data").joinpath("silero_vad.jit")
        with warnings.catch_warnings(), importlib.resources.as_file(model_file) as path:
            # The package ships a TorchScript file; torch marks jit.load deprecated, nothing to act on here.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*", category=DeprecationWarning)
            self._model = init_jit_model(str(path))._model  # the 16 kHz network inside the wrapper

    @classmethod
    def shared(cls) -> SileroScorer:
        """The process-wide model, loaded on first use."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def new_state(self) -> dict[str, Any]:
        torch = self._torch
        return {
            "context": np.zeros(CONTEXT_SAMPLES, dtype=np.float32),
            "h": torch.zeros(1, 128),
            "c": torch.zeros(1, 128),
        }

    def score(self, frames: NDArray[np.float32], state: dict[str, Any]) -> tuple[NDArray[np.float32], Any]:
        """Speech probability of each frame (shape (n, 512)), carrying the state across calls."""
        return self.score_many([(frames, state)])[0]

    def score_many(
        self, items: list[tuple[NDArray[np.float32], dict[str, Any]]]
    ) -> list[tuple[NDArray[np.float32], dict[str, Any]]]:
        """`score` for several streams at once: one pass of the front end over all their frames,
        and the LSTM stepped for all of them together (each stream with its own state)."""
        torch = self._torch
        model = self._model
        rnn = model.decoder.rnn
        counts = [len(frames) for frames, _ in items]
        starts = np.cumsum([0, *counts[:-1]]).tolist()
        inputs = np.concatenate(
            [
                np.concatenate(
                    [np.concatenate([state["context"][None, :], frames[:-1, -CONTEXT_SAMPLES:]]), frames], axis=1
                )
                for frames, state in items
            ]
        )
        with torch.inference_mode():
            features = model.encoder(model.run_extractors(torch.from_numpy(np.ascontiguousarray(inputs)))).squeeze(-1)
            h = torch.cat([state["h"] for _, state in items])
            c = torch.cat([state["c"] for _, state in items])
            hidden = torch.empty((sum(counts), h.shape[1]))
            for step in range(max(counts)):
                streams = [i for i, count in enumerate(counts) if count > step]
                rows = torch.tensor([starts[i] + step for i in streams])
                index = torch.tensor(streams)
                h_step, c_step = torch.lstm_cell(
                    features[rows], [h[index], c[index]], rnn.weight_ih, rnn.weight_hh, rnn.bias_ih, rnn.bias_hh
                )
                h[index], c[index] = h_step, c_step
                hidden[rows] = h_step
            out = model.decoder.decoder(hidden.unsqueeze(-1))
            probabilities = out.squeeze(1).mean(dim=1).numpy().astype(np.float32)
        return [
            (
                probabilities[start : start + count],
                {"context": frames[-1, -CONTEXT_SAMPLES:].copy(), "h": h[i : i + 1].clone(), "c": c[i : i + 1].clone()},
            )
            for i, ((frames, _), start, count) in enumerate(zip(items, starts, counts, strict=True))
        ]


@dataclass(slots=True)
class _Scoring:
    frames: NDArray[np.float32]
    state: dict[str, Any]
    done: Future[tuple[NDArray[np.float32], dict[str, Any]]]


class BatchingScorer:
    """Every session's frames scored on one thread: what arrives while a call runs is scored
    together in the next one (`SileroScorer.score_many`), so many sessions cost a few model calls
    rather than one each, and voice detection never holds more than one core."""

    _shared: BatchingScorer | None = None
    _shared_lock = threading.Lock()

    def __init__(self, scorer: SileroScorer, max_streams: int = 64) -> None:
        self.scorer = scorer
        self.max_streams = max_streams
        self.calls = 0  # model calls made, for tests and benchmarks
        self._waiting: queue.SimpleQueue[_Scoring | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="voice-detection", daemon=True)
        self._thread.start()

    @classmethod
    def shared(cls) -> BatchingScorer:
        """The process-wide scorer over the process-wide model, started on first use."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls(SileroScorer.shared())
            return cls._shared

    def new_state(self) -> dict[str, Any]:
        return self.scorer.new_state()

    def score(self, frames: NDArray[np.float32], state: dict[str, Any]) -> tuple[NDArray[np.float32], Any]:
        """Blocks the calling (session) thread until its frames are scored."""
        job = _Scoring(frames, state, Future())
        self._waiting.put(job)
        return job.done.result()

    def close(self) -> None:
        self._waiting.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import torch

        # One thread: each call is a few small products, which a second thread only slows (measured on
        # 100 ms of audio: 1.5 ms of wall time and 1.5 ms of CPU, against 2.0 ms and 4.0 ms on two),
        # and the inference workers need the other cores. torch's thread count is per calling thread.
        torch.set_num_threads(1)
        while True:
            job = self._waiting.get()
            if job is None:
                return
            jobs = [job]
            while len(jobs) < self.max_streams:
                try:
                    more = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._waiting.put(None)  # stop after this call
                    break
                jobs.append(more)
            try:
                results = self.scorer.score_many([(j.frames, j.state) for j in jobs])
            except Exception as exc:
                for j in jobs:
                    j.done.set_exception(exc)
                continue
            finally:
                self.calls += 1
            for j, result in zip(jobs, results, strict=True):
                j.done.set_result(result)


class VoiceActivityDetector:
    """One session's endpointing: feed 16 kHz audio, get speech start/end events.

    Speech starts once `min_speech_ms` of consecutive frames score at least `threshold` (the event
    is dated at the first of them). It ends once `silence_ms` of frames score below
    `threshold - 0.15` (the event is dated where that silence began, and says whether any of that
    silence after its first frames scored VOICE_TRACE or more).
    """

    def __init__(
        self, scorer: FrameScorer, *, threshold: float = 0.5, silence_ms: int = 500, min_speech_ms: int = 96
    ) -> None:
        self.scorer = scorer
        self.threshold = threshold
        self.negative_threshold = max(0.01, threshold - NEGATIVE_MARGIN)
        self.silence_frames = max(1, math.ceil(silence_ms * MODEL_SAMPLE_RATE / 1000 / FRAME_SAMPLES))
        self.min_speech_frames = max(1, math.ceil(min_speech_ms * MODEL_SAMPLE_RATE / 1000 / FRAME_SAMPLES))
        self.in_speech = False
        self._state = scorer.new_state()
        self._carry = np.zeros(0, dtype=np.float32)  # less than one frame, waiting for more audio
        self._position = 0  # sample where the next frame starts
        self._candidate: int | None = None  # first sample of a run of speech frames not yet confirmed
        self._candidate_frames = 0
        self._silence_start: int | None = None
        self._silence_frames = 0
        self._silence_peak = 0.0  # the highest score in the silence after its first frames

    def process(self, samples: NDArray[np.float32]) -> list[SpeechEvent]:
        """Score every whole frame now available; returns the events they caused, in order."""
        audio = np.concatenate([self._carry, samples]) if len(self._carry) else samples
        whole = len(audio) // FRAME_SAMPLES * FRAME_SAMPLES
        self._carry = audio[whole:].copy()
        if whole == 0:
            return []
        frames = audio[:whole].reshape(-1, FRAME_SAMPLES).astype(np.float32, copy=False)
        events: list[SpeechEvent] = []
        for first in range(0, len(frames), SCORE_FRAMES):  # bounded work and memory per model call
            probabilities, self._state = self.scorer.score(frames[first : first + SCORE_FRAMES], self._state)
            for probability in probabilities.tolist():
                event = self._step(probability)
                if event is not None:
                    events.append(event)
                self._position += FRAME_SAMPLES
        return events

    def finish(self, end: int) -> list[SpeechEvent]:
        """End of stream at sample `end`: score the last partial frame; open speech ends at `end`."""
        events: list[SpeechEvent] = []
        if len(self._carry):
            padded = np.zeros(FRAME_SAMPLES, dtype=np.float32)
            padded[: len(self._carry)] = self._carry
            self._carry = np.zeros(0, dtype=np.float32)
            events = self.process(padded)
        if self.in_speech:
            self.in_speech = False
            self._silence_start, self._silence_frames = None, 0
            events.append(SpeechEvent("end", end))
        self._candidate = None
        return events

    def _step(self, probability: float) -> SpeechEvent | None:
        if not self.in_speech:
            if probability >= self.threshold:
                if self._candidate is None:
                    self._candidate, self._candidate_frames = self._position, 0
                self._candidate_frames += 1
                if self._candidate_frames >= self.min_speech_frames:
                    self.in_speech = True
                    self._silence_start, self._silence_frames = None, 0
                    start, self._candidate = self._candidate, None
                    return SpeechEvent("start", start)
            else:
                self._candidate = None
            return None
        if probability >= self.threshold:
            self._silence_start, self._silence_frames = None, 0
        elif probability < self.negative_threshold or self._silence_start is not None:
            if self._silence_start is None:
                self._silence_start, self._silence_peak = self._position, 0.0
            if self._silence_frames >= QUIET_SKIP_FRAMES:
                self._silence_peak = max(self._silence_peak, probability)
            self._silence_frames += 1
            if self._silence_frames >= self.silence_frames:
                self.in_speech = False
                end, self._silence_start, self._silence_frames = self._silence_start, None, 0
                return SpeechEvent("end", end, voiced=self._silence_peak >= VOICE_TRACE)
        return None

    @property
    def silent_since(self) -> int | None:
        """Where the silence inside speech that is going on now began (None: no such silence; the
        speech is heard, or it has ended)."""
        return self._silence_start if self.in_speech else None

    @classmethod
    def from_settings(cls, scorer: FrameScorer, settings: Settings) -> VoiceActivityDetector:
        return cls(
            scorer,
            threshold=settings.vad_threshold,
            silence_ms=settings.vad_silence_ms,
            min_speech_ms=settings.vad_min_speech_ms,
        )
