"""Hallucination and loop guards: exact verdicts on known texts."""

from __future__ import annotations

import pytest

from real_time_audio.streaming.guards import GuardThresholds, compression_ratio, loop_start, verdict

THRESHOLDS = GuardThresholds()


def test_compression_ratio_separates_loops_from_sentences() -> None:
    """A sentence compresses poorly; the same phrase thirty times compresses very well."""
    assert compression_ratio("") == 0.0
    assert compression_ratio("the quick brown fox jumps over the lazy dog") < 1.2
    assert compression_ratio("thank you for watching " * 30) > 8


@pytest.mark.parametrize(
    ("text", "avg_logprob", "no_speech", "expected"),
    [
        ("hello there", -0.3, 0.9, "speech"),  # confident text wins over a high no-speech probability
        ("thank you", -1.4, 0.8, "no_speech"),
        ("thank you", -1.4, 0.2, "speech"),
        ("thank you", -1.4, None, "speech"),  # a model without a no-speech token
        ("la " * 40, -0.1, 0.0, "degenerate"),
    ],
)
def test_verdicts(text: str, avg_logprob: float, no_speech: float | None, expected: str) -> None:
    """Whisper's rule: no-speech needs both signals; a loop is degenerate whatever its scores."""
    assert verdict(text, avg_logprob, no_speech, THRESHOLDS) == expected


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["no", "no", "no"], None),
        (["word"] * 6, None),  # a speaker can say it six times (a real clip of the accuracy benchmark does)
        (["word"] * 7, None),
        (["no"] * 8, 1),
        (["i", "said", "go", "on", "go", "on", "go", "on", "now"], 4),
        (["a", "b", "c", "a", "b", "c"], None),
        (["x", "a", "b", "c", "a", "b", "c", "a", "b", "c"], 4),
        (["one", "two", "three", "four", "five"], None),
        ([], None),
    ],
)
def test_loop_start(words: list[str], expected: int | None) -> None:
    """The cut falls after the first copy of the repeated n-gram."""
    assert loop_start(words) == expected
