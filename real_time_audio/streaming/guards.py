"""Guards against the classic Whisper failures on live audio: text on silence and looping text.

A decode is "not speech" when the model itself says so (no-speech probability high and average
log-probability low, Whisper's own rule) and "degenerate" when its text compresses too well
(a loop). Looping words are also found directly, by a repeated n-gram, and cut off.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

MAX_LOOP_NGRAM = 4
# "no no no", even "word, word, word, word, word. Word." (a real clip of the accuracy benchmark) is
# speech; the same word eight times in a row is a loop.
SINGLE_WORD_REPEATS = 8
NGRAM_REPEATS = 3


@dataclass(slots=True, frozen=True)
class GuardThresholds:
    no_speech: float = 0.6
    logprob: float = -1.0
    compression_ratio: float = 2.4


def compression_ratio(text: str) -> float:
    """Length of the text over its zlib-compressed length: high for repetitive text."""
    data = text.encode("utf-8")
    if not data:
        return 0.0
    return len(data) / len(zlib.compress(data))


def verdict(
    text: str, avg_logprob: float, no_speech_prob: float | None, thresholds: GuardThresholds
) -> Literal["speech", "no_speech", "degenerate"]:
    """Whether a decode's text should be kept."""
    if no_speech_prob is not None and no_speech_prob > thresholds.no_speech and avg_logprob < thresholds.logprob:
        return "no_speech"
    if compression_ratio(text) > thresholds.compression_ratio:
        return "degenerate"
    return "speech"


def loop_start(keys: Sequence[str]) -> int | None:
    """Index where a run of repeated n-grams turns into a loop (after its first copy), or None.

    A single word repeated SINGLE_WORD_REPEATS times, or an n-gram of 2 to 4 words repeated
    NGRAM_REPEATS times back to back, counts as a loop.
    """
    for index in range(len(keys)):
        for size in range(1, MAX_LOOP_NGRAM + 1):
            gram = list(keys[index : index + size])
            if len(gram) < size:
                break
            if any(size % unit == 0 and gram == gram[:unit] * (size // unit) for unit in range(1, size)):
                continue  # "word word" is the single word repeated: its own rule counts it
            repeats = 1
            while keys[index + repeats * size : index + (repeats + 1) * size] == gram:
                repeats += 1
            if repeats >= (SINGLE_WORD_REPEATS if size == 1 else NGRAM_REPEATS):
                return index + size
    return None
