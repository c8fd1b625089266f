"""The first-version streaming policy, without a model."""

from __future__ import annotations

import itertools

import numpy as np

from real_time_audio.streaming import FixedSegmentPolicy

RATE = 16000


def policy(**kw: object) -> FixedSegmentPolicy:
    options = {"partial_interval_s": 1.0, "segment_max_s": 3.0, "interim_results": True} | kw
    return FixedSegmentPolicy(**options)  # type: ignore[arg-type]


def audio(seconds: float, value: float = 0.1) -> np.ndarray:
    return np.full(int(seconds * RATE), value, dtype=np.float32)


def test_partials_respect_the_interval() -> None:
    """A partial of the whole segment is due at most once per interval, and only with new audio."""
    p = policy()
    p.feed(audio(0.5))
    window = p.next_window(now=10.0, finalize_until=None)
    assert window is not None and not window.is_final and (window.start, window.end) == (0, 8000)
    p.accept(window, "a", "en")
    p.feed(audio(0.5))
    assert p.next_window(now=10.5, finalize_until=None) is None
    assert p.seconds_until_partial(10.5) == 0.5
    window = p.next_window(now=11.0, finalize_until=None)
    assert window is not None and window.end == 16000
    p.accept(window, "a b", "en")
    assert p.next_window(now=20.0, finalize_until=None) is None  # nothing new to show
    assert p.seconds_until_partial(20.0) is None


def test_no_partials_when_interim_results_are_off() -> None:
    """With interim_results false only finals are produced."""
    p = policy(interim_results=False)
    p.feed(audio(2.0))
    assert p.next_window(now=100.0, finalize_until=None) is None
    window = p.next_window(now=100.0, finalize_until=p.received)
    assert window is not None and window.is_final


def test_segment_is_finalized_at_its_maximum_length() -> None:
    """A segment that reaches segment_max_s becomes final at exactly that length; the rest carries on."""
    p = policy(interim_results=False)
    p.feed(audio(7.25))
    ends = []
    while (window := p.next_window(now=0.0, finalize_until=None)) is not None:
        texts = p.accept(window, f"s{window.segment_id}", None)
        assert [t.is_final for t in texts] == [True]
        ends.append(window.end)
    assert ends == [3 * RATE, 6 * RATE]
    assert p.pending == int(1.25 * RATE)


def test_every_sample_lands_in_exactly_one_final() -> None:
    """Random frames, flushes and partials: the finals tile the stream with no gap and no overlap."""
    rng = np.random.default_rng(7)
    p = policy(segment_max_s=2.0)
    covered: list[tuple[int, int]] = []
    stream = []
    now = 0.0
    for _ in range(400):
        chunk = rng.standard_normal(int(rng.integers(1, 9000))).astype(np.float32)
        stream.append(chunk)
        p.feed(chunk)
        now += 0.1
        flush = p.received if rng.random() < 0.05 else None
        while (window := p.next_window(now, flush)) is not None:
            start = window.start
            expected = np.concatenate(stream)[window.start : window.end]
            np.testing.assert_array_equal(window.audio, expected)
            texts = p.accept(window, "x", None)
            if window.is_final:
                covered.append((start, window.end))
                assert [t.segment_id for t in texts] == [len(covered) - 1]
    while (window := p.next_window(now, p.received)) is not None:
        p.accept(window, "x", None)
        if window.is_final:
            covered.append((window.start, window.end))
    assert covered[0][0] == 0 and covered[-1][1] == p.received
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))
    assert all(end - start <= 2 * RATE for start, end in covered)


def test_partial_of_a_finalized_segment_is_discarded() -> None:
    """A partial whose segment became final meanwhile is not sent."""
    p = policy()
    p.feed(audio(1.0))
    partial = p.next_window(now=5.0, finalize_until=None)
    final = p.next_window(now=5.0, finalize_until=p.received)
    assert partial is not None and final is not None
    assert [t.is_final for t in p.accept(final, "done", None)] == [True]
    assert p.accept(partial, "stale", None) == []


def test_failed_final_still_advances() -> None:
    """A final that could not be transcribed sends nothing but the next segment starts after it."""
    p = policy()
    p.feed(audio(1.0))
    final = p.next_window(now=0.0, finalize_until=p.received)
    assert final is not None
    assert p.accept(final, None, None) == []
    assert (p.segment_id, p.segment_start, p.pending) == (1, RATE, 0)
