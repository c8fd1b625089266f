"""Streaming policy: which stretch of a session's audio to transcribe next, and what the result means.

The policy is pure Python with no model and no I/O, so it is unit-tested on its own. The session
feeds it audio, asks it for the next window to transcribe, and hands back the engine's result; the
policy answers with the texts to send. A policy with voice-activity endpointing and word-level
agreement can replace `FixedSegmentPolicy` behind the same `StreamingPolicy` interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from real_time_audio.audio import MODEL_SAMPLE_RATE


@dataclass(slots=True, frozen=True)
class Window:
    """A stretch of session audio to transcribe; sample positions count from the session start."""

    segment_id: int
    start: int
    end: int
    is_final: bool
    audio: NDArray[np.float32]


@dataclass(slots=True, frozen=True)
class SegmentText:
    """A transcription for the client: a partial (may change) or a final (never changes)."""

    segment_id: int
    is_final: bool
    text: str
    start: float
    end: float
    language: str | None


class StreamingPolicy(Protocol):
    received: int  # samples fed so far
    transcribed: int  # samples covered by the latest transcription sent

    def feed(self, samples: NDArray[np.float32]) -> None: ...

    def next_window(self, now: float, finalize_until: int | None) -> Window | None: ...

    def accept(self, window: Window, text: str | None, language: str | None) -> list[SegmentText]: ...

    @property
    def pending(self) -> int: ...


class FixedSegmentPolicy:
    """First-version policy: one growing segment at a time.

    While audio arrives, the whole current segment is re-transcribed as a partial at most every
    `partial_interval_s`. It becomes final when it reaches `segment_max_s`, or on request (flush
    or end of stream); the next segment starts exactly where it ended, so every sample belongs
    to exactly one final.
    """

    def __init__(self, *, partial_interval_s: float, segment_max_s: float, interim_results: bool) -> None:
        self.partial_interval_s = partial_interval_s
        self.max_samples = int(segment_max_s * MODEL_SAMPLE_RATE)
        self.interim_results = interim_results
        self.segment_id = 0
        self.segment_start = 0  # sample where the current segment begins
        self.received = 0
        self.transcribed = 0
        # Audio from segment_start to received, as received; joined only when a window needs it,
        # so a frame costs no copy of the whole segment.
        self._chunks: list[NDArray[np.float32]] = []
        self._last_partial_at = float("-inf")
        self._last_partial_end = 0

    @property
    def pending(self) -> int:
        """Samples received but not yet in any final."""
        return self.received - self.segment_start

    def feed(self, samples: NDArray[np.float32]) -> None:
        if len(samples):
            self._chunks.append(samples)
            self.received += len(samples)

    def next_window(self, now: float, finalize_until: int | None) -> Window | None:
        """The next window to transcribe, or None when nothing is due.

        `finalize_until`: a sample position that everything before must be finalized (a flush or
        the end of stream), or None.
        """
        if self.pending >= self.max_samples:
            return self._window(self.segment_start + self.max_samples, final=True)
        if finalize_until is not None and finalize_until > self.segment_start:
            return self._window(min(finalize_until, self.segment_start + self.max_samples), final=True)
        if (
            self.interim_results
            and self.received > self._last_partial_end
            and now - self._last_partial_at >= self.partial_interval_s
        ):
            self._last_partial_at = now
            return self._window(self.received, final=False)
        return None

    def seconds_until_partial(self, now: float) -> float | None:
        """How long until a partial may be due again (None: no new audio to show)."""
        if not self.interim_results or self.received <= self._last_partial_end:
            return None
        return max(0.0, self._last_partial_at + self.partial_interval_s - now)

    def _segment_audio(self) -> NDArray[np.float32]:
        """The current segment's audio as one array (joined once, then kept joined)."""
        if len(self._chunks) != 1:
            self._chunks = [np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.float32)]
        return self._chunks[0]

    def _window(self, end: int, *, final: bool) -> Window:
        audio = self._segment_audio()[: end - self.segment_start]
        return Window(self.segment_id, self.segment_start, end, final, audio)

    def accept(self, window: Window, text: str | None, language: str | None) -> list[SegmentText]:
        """Take the result for `window` (None = it could not be transcribed) and say what to send."""
        if not window.is_final:
            if window.segment_id != self.segment_id or text is None:
                return []  # the segment was finalized meanwhile, or the partial failed
            self._last_partial_end = window.end
            self.transcribed = max(self.transcribed, window.end)
            return [self._text(window, text, language)]
        assert window.start == self.segment_start, "finals must come in order"
        rest = self._segment_audio()[window.end - window.start :]
        self._chunks = [rest.copy()] if len(rest) else []
        self.segment_start = window.end
        self.segment_id += 1
        self._last_partial_end = max(self._last_partial_end, window.end)
        self.transcribed = max(self.transcribed, window.end)
        if text is None:
            return []
        return [self._text(window, text, language)]

    @staticmethod
    def _text(window: Window, text: str, language: str | None) -> SegmentText:
        return SegmentText(
            window.segment_id,
            window.is_final,
            text,
            round(window.start / MODEL_SAMPLE_RATE, 3),
            round(window.end / MODEL_SAMPLE_RATE, 3),
            language,
        )
