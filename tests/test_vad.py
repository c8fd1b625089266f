"""Voice-activity detection: the endpointing state machine, and the Silero scorer on real speech."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from real_time_audio.audio.vad import (
    FRAME_SAMPLES,
    QUIET_SKIP_FRAMES,
    VOICE_TRACE,
    BatchingScorer,
    SileroScorer,
    SpeechEvent,
    VoiceActivityDetector,
)
from tests.conftest import needs_espeak

RATE = 16000


class ScriptedScorer:
    """Gives each frame the next probability from a script (a test double)."""

    def __init__(self, probabilities: list[float]) -> None:
        self.probabilities = probabilities
        self.index = 0

    def new_state(self) -> None:
        return None

    def score(self, frames: NDArray[np.float32], state: None) -> tuple[NDArray[np.float32], None]:
        out = self.probabilities[self.index : self.index + len(frames)]
        self.index += len(frames)
        return np.array(out, dtype=np.float32), None


def detect(probabilities: list[float], chunk_sizes: list[int] | None = None, **kw: int | float) -> list[SpeechEvent]:
    vad = VoiceActivityDetector(ScriptedScorer(probabilities), **kw)  # type: ignore[arg-type]
    audio = np.zeros(len(probabilities) * FRAME_SAMPLES, dtype=np.float32)
    events: list[SpeechEvent] = []
    position = 0
    for size in chunk_sizes or [len(audio)]:
        events += vad.process(audio[position : position + size])
        position += size
    events += vad.process(audio[position:])
    return events


def test_speech_starts_after_the_minimum_and_is_dated_at_its_first_frame() -> None:
    """Three speech frames (96 ms) start speech at the first of them; two do not."""
    assert detect([0.0, 0.9, 0.9, 0.0, 0.0]) == []
    assert detect([0.0, 0.9, 0.9, 0.9, 0.9]) == [SpeechEvent("start", FRAME_SAMPLES)]


def test_speech_ends_after_the_silence_length_dated_where_silence_began() -> None:
    """16 frames (512 ms) below the lower threshold end speech; the event is dated at the first."""
    script = [0.9] * 5 + [0.1] * 15 + [0.9] * 3 + [0.1] * 16
    events = detect(script, silence_ms=500)
    assert events == [SpeechEvent("start", 0), SpeechEvent("end", 23 * FRAME_SAMPLES)]


@pytest.mark.parametrize(
    ("pause", "voiced"),
    [
        ([0.3, 0.15] + [0.02] * 14, False),  # the last word fading out in the first frames: silent
        ([0.02] * 9 + [0.12] + [0.02] * 6, True),  # a released consonant or a breath well after it
        ([0.3, 0.15, 0.05] + [0.09] * 13, False),  # just under the trace
    ],
)
def test_an_end_says_whether_its_pause_had_a_trace_of_voice(pause: list[float], voiced: bool) -> None:
    """After its first QUIET_SKIP_FRAMES, a frame of the ending silence that scores VOICE_TRACE or
    more makes the pause voiced (the policy then waits for the whole tail)."""
    assert QUIET_SKIP_FRAMES == 3 and VOICE_TRACE == 0.1
    events = detect([0.9] * 5 + pause, silence_ms=500)
    assert events == [SpeechEvent("start", 0), SpeechEvent("end", 5 * FRAME_SAMPLES, voiced=voiced)]


def test_the_detector_says_where_the_pause_inside_speech_began() -> None:
    """`silent_since`: the first silent frame of a pause inside speech; None before speech, while it
    is heard, and once the pause has ended it."""
    script = [0.9] * 5 + [0.1] * 3 + [0.9] * 2 + [0.1] * 16
    vad = VoiceActivityDetector(ScriptedScorer(script), silence_ms=500)  # type: ignore[arg-type]
    seen = []
    for _ in script:
        vad.process(np.zeros(FRAME_SAMPLES, dtype=np.float32))
        seen.append(vad.silent_since)
    frame = FRAME_SAMPLES
    assert seen == [None] * 5 + [5 * frame] * 3 + [None] * 2 + [10 * frame] * 15 + [None]


def test_hysteresis_keeps_speech_through_uncertain_frames() -> None:
    """Frames between the two thresholds neither end speech nor start a silence."""
    script = [0.9] * 4 + [0.4] * 40 + [0.1] * 16
    assert detect(script) == [SpeechEvent("start", 0), SpeechEvent("end", 44 * FRAME_SAMPLES)]


def test_chunking_does_not_change_the_events() -> None:
    """Whatever the frame sizes the client sends, the events are the same."""
    rng = np.random.default_rng(5)
    script = [float(p) for p in (rng.random(400) > 0.4).astype(float) * 0.9]
    script[100:160] = [0.0] * 60
    whole = detect(script)
    sizes = [int(n) for n in rng.integers(1, 3000, size=400)]
    assert detect(script, chunk_sizes=sizes) == whole
    assert len(whole) >= 2


def test_end_of_stream_closes_open_speech() -> None:
    """finish() scores the last partial frame and ends speech that is still open."""
    vad = VoiceActivityDetector(ScriptedScorer([0.9] * 5))
    assert vad.process(np.zeros(4 * FRAME_SAMPLES + 100, dtype=np.float32)) == [SpeechEvent("start", 0)]
    assert vad.finish(end=4 * FRAME_SAMPLES + 100) == [SpeechEvent("end", 4 * FRAME_SAMPLES + 100)]
    assert not vad.in_speech


def test_loading_silero_keeps_torch_threads() -> None:
    """The silero package sets torch to one thread when imported; the scorer undoes that."""
    before = torch.get_num_threads()
    SileroScorer()
    assert torch.get_num_threads() == before


@needs_espeak
def test_silero_scores_equal_the_reference_streaming_model(say: Callable[[str], np.ndarray]) -> None:
    """Chunk-batched scoring gives the probabilities silero's own frame-by-frame wrapper gives."""
    from silero_vad import load_silero_vad

    audio = say("testing the voice activity detector")
    audio = audio[: len(audio) // FRAME_SAMPLES * FRAME_SAMPLES]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the package's own loader, as shipped
        reference = load_silero_vad()
    with torch.inference_mode():
        expected = [float(reference(torch.from_numpy(f.copy()), RATE)) for f in audio.reshape(-1, FRAME_SAMPLES)]
    scorer = SileroScorer()
    state = scorer.new_state()
    got: list[float] = []
    for block in np.array_split(audio.reshape(-1, FRAME_SAMPLES), 7):
        probabilities, state = scorer.score(block, state)
        got += probabilities.tolist()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert max(expected) > 0.9


@needs_espeak
def test_silero_finds_speech_between_silences(say: Callable[[str], np.ndarray]) -> None:
    """One sentence between a second of silence on each side: one start near 1 s, one end near its end."""
    sentence = say("please call stella and ask her to bring these things with her")
    audio = np.concatenate([np.zeros(RATE, np.float32), sentence, np.zeros(RATE, np.float32)])
    vad = VoiceActivityDetector(SileroScorer.shared())
    events = vad.process(audio)
    assert [e.kind for e in events] == ["start", "end"]
    assert 0.8 <= events[0].at <= 1.3
    assert 1.0 + len(sentence) / RATE - 0.6 <= events[1].at <= 1.0 + len(sentence) / RATE + 0.1


@pytest.mark.parametrize("level", [0.0, 0.003, 0.02])
def test_silero_hears_no_speech_in_silence_or_noise(level: float) -> None:
    """A minute of silence or white noise produces no event at all."""
    noise = (np.random.default_rng(1).standard_normal(60 * RATE) * level).astype(np.float32)
    vad = VoiceActivityDetector(SileroScorer.shared())
    assert vad.process(noise) == []
    assert vad.finish(end=len(noise)) == []


def _streams() -> list[np.ndarray]:
    """Three streams of frames with speech-like bursts, of different lengths."""
    from tests.conftest import speech_like

    clips = [speech_like(seed, seconds) for seed, seconds in ((1, 3.0), (2, 1.2), (3, 2.2))]
    return [c[: len(c) // FRAME_SAMPLES * FRAME_SAMPLES].reshape(-1, FRAME_SAMPLES) for c in clips]


def test_streams_scored_together_score_as_they_do_alone() -> None:
    """score_many over streams of different lengths, call after call, gives each stream the
    probabilities and state it gets when scored on its own."""
    scorer = SileroScorer.shared()
    streams = _streams()
    alone: list[list[float]] = []
    for frames in streams:
        state = scorer.new_state()
        got: list[float] = []
        for block in np.array_split(frames, 4):
            probabilities, state = scorer.score(block, state)
            got += probabilities.tolist()
        alone.append(got)
    states = [scorer.new_state() for _ in streams]
    together: list[list[float]] = [[] for _ in streams]
    for part in range(4):
        blocks = [np.array_split(frames, 4)[part] for frames in streams]
        results = scorer.score_many(list(zip(blocks, states, strict=True)))
        for index, (probabilities, state) in enumerate(results):
            together[index] += probabilities.tolist()
            states[index] = state
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5)
    assert len({round(sum(a), 3) for a in alone}) == 3  # the streams really differ


class _GatedScorer:
    """The real scorer, whose first call waits until the test lets it go (so that the sessions
    that arrive meanwhile are known to wait for the next call, however busy the machine is)."""

    def __init__(self) -> None:
        self.inner = SileroScorer.shared()
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.sizes: list[int] = []

    def new_state(self) -> dict[str, Any]:
        return self.inner.new_state()

    def score_many(self, items: list[Any]) -> list[Any]:
        self.sizes.append(len(items))
        self.entered.set()
        self.gate.wait(timeout=60)
        return self.inner.score_many(items)


def test_the_batching_scorer_scores_many_sessions_in_few_calls() -> None:
    """Sessions scoring while a call runs are all served by the next call, each with its own result."""
    gated = _GatedScorer()
    scorer = BatchingScorer(gated)  # type: ignore[arg-type]
    streams = _streams() * 4  # twelve sessions
    expected = [SileroScorer.shared().score(frames, SileroScorer.shared().new_state())[0] for frames in streams]
    results: list[np.ndarray | None] = [None] * len(streams)

    def session(index: int) -> None:
        results[index] = scorer.score(streams[index], scorer.new_state())[0]

    threads = [threading.Thread(target=session, args=(i,)) for i in range(len(streams))]
    for thread in threads:
        thread.start()
    assert gated.entered.wait(timeout=60)
    deadline = time.monotonic() + 60
    while scorer._waiting.qsize() < len(streams) - gated.sizes[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    gated.gate.set()
    for thread in threads:
        thread.join(timeout=60)
    scorer.close()
    for got, want in zip(results, expected, strict=True):
        assert got is not None
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert sum(gated.sizes) == len(streams)
    assert scorer.calls == len(gated.sizes) <= 2


def test_a_failing_call_fails_its_sessions_and_the_scorer_goes_on() -> None:
    scorer = BatchingScorer(SileroScorer.shared())
    with pytest.raises(ValueError):
        scorer.score(np.zeros((2, 7), np.float32), scorer.new_state())  # frames of the wrong size
    frames = _streams()[0]
    probabilities, _ = scorer.score(frames, scorer.new_state())
    scorer.close()
    assert len(probabilities) == len(frames)
