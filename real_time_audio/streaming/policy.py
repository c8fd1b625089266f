"""Streaming policy: which stretch of a session's audio to decode next, and what each result means.

The policy is pure Python with no model and no I/O, so it is tested on its own (with a scripted
transcriber standing in for Whisper). The session feeds it audio with the voice-activity events
for that audio, asks it for the next window to decode, and hands back what the model heard; the
policy answers with the transcriptions to send.

How a session's audio becomes text:
- Only speech is decoded. A speech region runs from a speech start (minus `pad_s` of pre-roll) to
  a speech end (plus `tail_s`, so that a word ending the detector scores as silence, a whispered
  or unvoiced last consonant, is heard whole; the region's final decode waits for that audio); the
  audio between regions never reaches the model.
- Inside a region the buffer from `decode_start` to the newest sample is re-decoded every
  `partial_interval_s`. Words that two consecutive decodes agree on are committed and sent as a
  final (LocalAgreement-2); the rest is sent as the partial. A session without partials
  (`interim_results` off) has none of these decodes: its utterances are decoded once they end, or
  when they fill the buffer.
- Once the buffer is longer than `trim_s`, its start moves up to the end of a committed word,
  keeping the last `keep_s` of committed audio (whose words the decodes are made to begin with);
  a decode never covers more than `max_window_s`. Committed text that leaves the buffer becomes
  the prompt (at most `context_chars` characters) for the next decodes.
- When the region ends, on flush and at the end of the stream, the buffer is decoded one last
  time and every word not yet committed is sent as a final.
- After a short pause the next utterance is decoded as the continuation of the previous one: the
  previous utterance's audio stays at the start of the buffer and its committed words are the
  decode's prefix. The words of the utterance that just ended are held back for up to `hold_s`
  of silence: if the speaker goes on, they are decoded again with the words that follow (so a
  pause inside a sentence does not end it with a period); otherwise they become final as heard.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.typing import NDArray

from real_time_audio.audio.pcm import MODEL_SAMPLE_RATE
from real_time_audio.audio.vad import SpeechEvent
from real_time_audio.service import Word
from real_time_audio.streaming.agreement import SETTLE_AGE_S, LocalAgreement, join_words, unsure
from real_time_audio.streaming.guards import GuardThresholds, loop_start, verdict

if TYPE_CHECKING:
    from real_time_audio.config import Settings
    from real_time_audio.service import TranscriptionResult

MIN_PARTIAL_S = 0.3  # too little new audio for a useful partial decode
PAUSE_S = 0.1  # no partial is cut while the speaker has been silent this long (until speech or the final)
# An utterance's first partial waits for this much speech after its onset (the pre-roll before the
# onset is not speech): a decode of the first tenth of a second of it hears nothing or a word.
FIRST_PARTIAL_SPEECH_S = 0.5
# A session's partials are spaced at least this many times their recent round trip (queue wait and
# decode), so that under load each session asks for less and finals keep their pace: while the
# utterance shows no words yet, and (more widely) once a partial shows words, which later partials
# only refresh.
PARTIAL_COST_FACTOR = 2.0
REFRESH_COST_FACTOR = 4.0
PARTIAL_COST_SMOOTHING = 0.5  # weight of the newest round trip in the running estimate
CONTEXT_GAP_S = 3.0  # a pause longer than this ends the sentence: the previous utterance's audio is let go
# A word of a re-heard held utterance may end this much later than it did in the utterance's final.
HELD_SLACK_S = 0.25
# Held words that a partial hears again exactly as they were heard (punctuation and case too), after
# this much of the speech that follows them, are final: what follows did not change them.
HELD_ALIKE_S = 1.0
CAP_HOLD_BACK_S = 1.0  # when the buffer is full, words ending this close to its end wait
# Speech at least this long that a decode left untranscribed (the model ended its text early, as
# Whisper may at a pause after the sentence it was given as the prefix) is decoded again on its own.
UNHEARD_SPEECH_S = 1.0
MAX_HEARD_AGAIN = 3  # such decodes per utterance, so that no audio can make one cost more than this
MIN_CAP_PROGRESS_S = 1.0  # a full buffer always moves on at least this far
# A stream cut by a shutdown in mid-utterance resumes from the utterance's start, at most this far back
# (clients keep a minute of audio to resend).
MAX_RESUME_S = 30.0
TAIL_SLACK_S = 0.25  # a region's tail is waited for this much longer than real-time pace takes
RECENT_FINALS = 64


@dataclass(slots=True, frozen=True)
class Window:
    """A stretch of session audio to decode; sample positions count from the session start."""

    start: int
    end: int
    kind: Literal["partial", "cap", "final"]
    audio: NDArray[np.float32]
    context: str  # committed text that left the buffer, for the prompt
    prefix: str  # committed words at the start of this audio: the decode continues after them
    epoch: int  # the buffer position this window was cut from; a partial from an older one is stale
    draft: str = ""  # the words the last decode heard after the prefix (a hint for the decoder)

    @property
    def is_final(self) -> bool:
        """Finals and full-buffer windows must run; only partials may be skipped under load."""
        return self.kind != "partial"


@dataclass(slots=True, frozen=True)
class SegmentText:
    """A transcription for the client: a partial (may change) or a final (never changes)."""

    segment_id: int
    is_final: bool
    text: str
    start: float
    end: float
    language: str | None
    words: tuple[Word, ...]
    lag: float


@dataclass(slots=True, frozen=True)
class Resume:
    """Where a stream cut by a shutdown may go on in a new session: the finals from `segment_id`
    on cover audio from `sample`; a client that resends its audio from `sample` elsewhere replaces
    them with what the new session hears (so a word cut in two is heard whole)."""

    segment_id: int
    sample: int


@dataclass(slots=True)
class _Region:
    """Speech not yet finalized: from `start` to `end` (None while the speaker goes on)."""

    start: int
    end: int | None = None
    onset: int = 0  # where the voice activity heard the speech begin (after the pre-roll)
    speech_end: int | None = None  # where it heard the speech end (`end` adds the tail)


@dataclass(slots=True)
class PolicyStats:
    """What the policy did, for tests and benchmarks."""

    windows: dict[str, int] = field(default_factory=lambda: {"partial": 0, "cap": 0, "final": 0})
    longest_window: int = 0
    dropped_no_speech: int = 0
    dropped_degenerate: int = 0
    loops_cut: int = 0
    heard_again: int = 0  # speech a decode left untranscribed, decoded again on its own


class UtterancePolicy:
    """Voice-activity endpointing with LocalAgreement-2 partials; see the module docstring."""

    def __init__(
        self,
        *,
        partial_interval_s: float = 1.0,
        max_partial_interval_s: float | None = None,
        max_window_s: float = 30.0,
        trim_s: float = 15.0,
        keep_s: float = 6.0,
        pad_s: float = 0.4,
        tail_s: float | None = None,
        quiet_tail_s: float | None = None,
        context_chars: int = 200,
        context_audio_s: float = 20.0,
        hold_s: float = 1.2,
        settle_age_s: float = SETTLE_AGE_S,
        interim_results: bool = True,
        vad_enabled: bool = True,
        guards: GuardThresholds | None = None,
    ) -> None:
        self.partial_interval_s = partial_interval_s
        self.refresh_interval_s = partial_interval_s
        self.base_partial_interval_s = partial_interval_s
        self.max_partial_interval_s = max(partial_interval_s, max_partial_interval_s or partial_interval_s)
        self.partial_cost_s = 0.0  # running estimate of a partial's round trip
        self.max_samples = int(max_window_s * MODEL_SAMPLE_RATE)
        self.trim_samples = int(min(trim_s, max_window_s) * MODEL_SAMPLE_RATE)
        # At most half the buffer stays when it is cut, so that a cut always makes room.
        self.keep = min(int(keep_s * MODEL_SAMPLE_RATE), self.trim_samples // 2)
        self.pad = int(pad_s * MODEL_SAMPLE_RATE)
        self.tail = self.pad if tail_s is None else int(tail_s * MODEL_SAMPLE_RATE)
        self.quiet_tail = self.tail if quiet_tail_s is None else int(quiet_tail_s * MODEL_SAMPLE_RATE)
        self.context_chars = context_chars
        self.context_audio = int(context_audio_s * MODEL_SAMPLE_RATE)
        self.context_gap = int(CONTEXT_GAP_S * MODEL_SAMPLE_RATE)
        self.hold_s = min(hold_s, CONTEXT_GAP_S)
        self.hold = int(self.hold_s * MODEL_SAMPLE_RATE)
        self.interim_results = interim_results
        self.guards = guards or GuardThresholds()
        self.stats = PolicyStats()
        self.segment_id = 0
        self.received = 0
        self.transcribed = 0  # samples settled: decoded, or known to be silence
        self._buffer_start = 0  # first sample still held in _chunks
        self._chunks: list[NDArray[np.float32]] = []
        self._regions: deque[_Region] = deque()
        self._floor = 0  # everything before this sample is final
        self._decode_start = 0
        self._epoch = 0
        self._agreement = LocalAgreement(settle_age_s)
        self._buffered_words: list[Word] = []  # committed words still inside the buffer
        # Where the previous utterance ended while its audio is kept as context for the next one
        # (the model then hears the sentence so far), or None.
        self._carry_end: int | None = None
        self._context = ""
        # The last utterance's words, decoded but held back until the pause outlasts the hold (or
        # the next decode hears them again with what follows): the sample and the wall-clock time
        # at which they become final as they are; finals waiting to be sent.
        self._held: list[Word] = []
        self._held_until = 0
        self._held_deadline: float | None = None
        self._held_language: str | None = None
        self._due: list[SegmentText] = []
        self._last_word_end = 0.0
        self._last_partial_at = -math.inf
        self._last_partial_end = 0
        self._silent_since: int | None = None  # the pause the speaker is in (from the voice activity)
        self._last_partial_asked = 0  # the end of the last partial window handed out, answered or not
        # Where the server stopped reading this stream (a shutdown) and whether speech was going on
        # there; and the point a client may resend from in another session (segment id, sample).
        self._cut: int | None = None
        self._cut_from: int | None = None  # the start of the utterance cut in its middle
        self._resume: Resume | None = None
        # The latest finals: id, first word's start, last word's start, last word's end (seconds).
        self._recent_finals: deque[tuple[int, float, float, float]] = deque(maxlen=RECENT_FINALS)
        self._last_speech_end = 0  # where the latest utterance ended, its padding included
        self._previous_speech_end: int | None = None  # where the detector heard the last finished utterance end
        self._tail_deadline: float | None = None  # when a region's final stops waiting for its tail
        self._heard_again = 0  # decodes of the current utterance's untranscribed speech
        if not vad_enabled:
            self._regions.append(_Region(0))  # without VAD the whole stream is one region

    @classmethod
    def from_settings(cls, settings: Settings, interim_results: bool = True) -> UtterancePolicy:
        return cls(
            partial_interval_s=settings.partial_interval_ms / 1000,
            max_partial_interval_s=settings.partial_interval_max_ms / 1000,
            max_window_s=settings.segment_max_s,
            trim_s=settings.buffer_trim_s,
            keep_s=settings.buffer_keep_s,
            pad_s=settings.vad_pad_ms / 1000,
            tail_s=settings.vad_tail_ms / 1000,
            quiet_tail_s=settings.vad_quiet_tail_ms / 1000,
            context_chars=settings.context_prompt_chars,
            context_audio_s=settings.context_audio_s,
            hold_s=settings.final_hold_ms / 1000,
            settle_age_s=settings.commit_delay_s,
            interim_results=interim_results,
            vad_enabled=settings.vad != "off",
            guards=GuardThresholds(
                no_speech=settings.no_speech_threshold,
                logprob=settings.logprob_threshold,
                compression_ratio=settings.compression_ratio_threshold,
            ),
        )

    # -- input ----------------------------------------------------------------------------------

    def hold_longest(self) -> None:
        """Hold an ended utterance's words across every pause that the next utterance can still be
        decoded after (CONTEXT_GAP_S), unless holding is off: for whole recordings, whose finals
        have no latency to keep, so a sentence that goes on after a long breath is heard whole."""
        if self.hold > 0:
            self.hold_s = CONTEXT_GAP_S
            self.hold = int(CONTEXT_GAP_S * MODEL_SAMPLE_RATE)

    @property
    def pending(self) -> int:
        """Samples held for decoding (bounded by the session's back-pressure)."""
        return self.received - self._buffer_start

    @property
    def in_speech(self) -> bool:
        return bool(self._regions)

    def feed(
        self, samples: NDArray[np.float32], events: Sequence[SpeechEvent] = (), silent_since: int | None = None
    ) -> None:
        """Add audio and the voice-activity events found in it (or before it); `silent_since`:
        where the pause that the speaker is in now began (None: speech is heard, or no VAD)."""
        self._silent_since = silent_since
        if len(samples):
            self._chunks.append(samples)
            self.received += len(samples)
        for event in events:
            if event.kind == "start":
                start = max(event.sample - self.pad, self._floor, self._buffer_start)
                if self._regions and (previous := self._regions[-1]).end is not None and previous.end > start:
                    previous.end = max(start, previous.start)  # its tail ends where this pre-roll begins
                self._regions.append(_Region(start, onset=event.sample))
                if len(self._regions) == 1:
                    if self._carry_end is not None and start - self._carry_end > self.context_gap:
                        self._release_carry()
                    if self._carry_end is None:
                        self._set_decode_start(start)
                    self._carry_end = None  # the kept audio now leads into this utterance
            elif self._regions and self._regions[-1].end is None:
                # The tail may reach past what has been received: the final decode waits for it.
                # A silent pause has nothing more to hear: its tail is what the detector took to end it.
                tail = self.tail if event.voiced else min(self.tail, self.quiet_tail)
                region = self._regions[-1]
                region.end = max(event.sample + tail, region.start)
                region.speech_end = event.sample
                self._last_speech_end = max(min(event.sample + self.pad, self.received), self._regions[-1].start)
        if not self._regions:  # silence: keep only the pre-roll (and the previous utterance, for a while)
            self.transcribed = self.received
            if self._carry_end is not None and self.received - self._carry_end > self.context_gap:
                self._release_carry()
            if self._carry_end is None:
                self._drop_audio_before(max(self._buffer_start, self.received - self.pad))

    def cut(self, sample: int) -> None:
        """The server stops reading this stream at `sample` (it shuts down); call before the end
        of speech is fed. An utterance going on there is to be heard again, whole, elsewhere:
        see `resume`."""
        self._cut = sample
        if self._regions and self._regions[-1].end is None:
            start = self._regions[-1].start
            # From the pause before the utterance: its pre-roll, but never the padding after the one before.
            self._cut_from = max(start, self._last_speech_end, sample - int(MAX_RESUME_S * MODEL_SAMPLE_RATE))

    @property
    def resume(self) -> Resume:
        """After a cut stream is finalized: where a client may resend its audio from, and the
        first final that a new session hearing it replaces (when no speech was cut: the end of
        everything received, and the next segment id)."""
        if self._resume is not None:
            return self._resume
        return Resume(self.segment_id, self.received)

    # -- scheduling -----------------------------------------------------------------------------

    def next_window(self, now: float, finalize_until: int | None = None) -> Window | None:
        """The next window to decode, or None when nothing is due.

        `finalize_until`: everything before this sample must be finalized (a flush or the end of
        stream), or None.
        """
        while self._regions:
            region = self._regions[0]
            start = self._decode_start
            closing = region.end
            if closing is not None and closing > self.received:  # its tail is still coming
                if finalize_until is None and not self._tail_overdue(now, closing):
                    return None
                closing = region.end = max(self.received, region.start)
            self._tail_deadline = None
            if closing is None and finalize_until is not None and finalize_until > max(start, region.start):
                closing = finalize_until
            if closing is not None and closing <= max(start, region.start):  # nothing left in it to decode
                self._finish_region(closing)
                continue
            if (closing if closing is not None else self.received) - start > self.max_samples:
                return self._window(start, start + self.max_samples, "cap")
            if closing is not None:
                return self._window(start, closing, "final")
            if self._partial_wait(now) == 0.0:
                self._last_partial_at, self._last_partial_asked = now, self.received
                return self._window(start, self.received, "partial")
            return None
        return None

    def _tail_overdue(self, now: float, end: int) -> bool:
        """Whether the wait for a region's tail is over: the audio stopped coming (a client that
        goes quiet without ending the stream) for longer than the tail takes at real-time pace."""
        if self._tail_deadline is None:
            self._tail_deadline = now + (end - self.received) / MODEL_SAMPLE_RATE + TAIL_SLACK_S
        return now >= self._tail_deadline

    def seconds_until_tail(self, now: float) -> float | None:
        """How long until a region's final is decoded without the rest of its tail (None: not waiting)."""
        if self._tail_deadline is None or not self._regions or self._regions[0].end is None:
            return None
        return max(0.0, self._tail_deadline - now)

    def partial_round_trip(self, seconds: float | None) -> None:
        """How long the last partial took from request to result (None: the engine refused it as
        too busy). The intervals follow: PARTIAL_COST_FACTOR and REFRESH_COST_FACTOR times the
        running estimate, within their bounds."""
        if seconds is None:  # refused: as if it had taken the whole interval
            seconds = max(self.partial_cost_s, self.partial_interval_s)
        if self.partial_cost_s == 0.0:
            self.partial_cost_s = seconds
        else:
            self.partial_cost_s += PARTIAL_COST_SMOOTHING * (seconds - self.partial_cost_s)
        wanted = PARTIAL_COST_FACTOR * self.partial_cost_s
        self.partial_interval_s = min(self.max_partial_interval_s, max(self.base_partial_interval_s, wanted))
        wanted = REFRESH_COST_FACTOR * self.partial_cost_s
        self.refresh_interval_s = min(self.max_partial_interval_s, max(self.base_partial_interval_s, wanted))

    def _interval(self) -> float:
        """The spacing of partials now: wider while a partial shows words that the next would refresh."""
        return self.refresh_interval_s if self._agreement.tail else self.partial_interval_s

    def seconds_until_partial(self, now: float) -> float | None:
        """How long until a partial decode may be due (None: nothing new to decode)."""
        if not self._regions or self._regions[0].end is not None:
            return None
        return self._partial_wait(now)

    def _partial_wait(self, now: float) -> float | None:
        """Seconds until the next partial (0: due now; None: not enough new audio, which will wake
        the session). The one held words wait for keeps only the configured interval."""
        if not self._partial_ready():
            return None
        held_check = self._held_check_due()
        if not held_check and self._pausing():
            return None  # what the pause ends in (more speech, or the utterance's final) is decoded instead
        interval = self.base_partial_interval_s if held_check else self._interval()
        return max(0.0, self._last_partial_at + interval - now)

    def _pausing(self) -> bool:
        """Whether the speaker has paused for PAUSE_S or more: a partial now would hear nothing
        new, and if the pause lasts the utterance's final decode comes within VAD_SILENCE_MS."""
        return self._silent_since is not None and self.received - self._silent_since >= PAUSE_S * MODEL_SAMPLE_RATE

    def _held_check_due(self) -> bool:
        """Whether held words wait for a partial that no partial has yet made: one that has heard
        HELD_ALIKE_S of the speech that follows them, or their settle age past them. Such a partial
        is due once the configured interval has passed, however far a busy server has stretched
        the cadence, so that held words are not kept waiting by it. Once asked for, it is not
        asked for again should the engine refuse it (the cadence then decides)."""
        if not self._held or not self._regions:
            return False
        alike = self._regions[0].start + self.pad + round(HELD_ALIKE_S * MODEL_SAMPLE_RATE)
        settled = self._sample(self._agreement.settled_at(self._held))
        return any(self._last_partial_asked < at <= self.received for at in (alike, settled))

    def _partial_ready(self) -> bool:
        """Whether there is new audio enough for a partial of the current utterance: at least
        MIN_PARTIAL_S past where the decode starts, and FIRST_PARTIAL_SPEECH_S past the onset.
        Decoded after the previous utterance's audio, the first partial waits for the
        UNHEARD_SPEECH_S that it takes to tell whether the model hears the new speech there (less
        of it comes back with nothing new)."""
        if not self.interim_results or not self._regions or self.received <= self._last_partial_end:
            return False
        region = self._regions[0]
        heard = max(self._decode_start, region.start) + MIN_PARTIAL_S * MODEL_SAMPLE_RATE
        first = region.onset + round(FIRST_PARTIAL_SPEECH_S * MODEL_SAMPLE_RATE)
        if self._decode_start < region.start <= region.onset:  # a new utterance, after the previous one's audio
            first = max(first, region.start + self.pad + round(UNHEARD_SPEECH_S * MODEL_SAMPLE_RATE))
        return self.received >= max(heard, first)

    def settle(self, now: float, finalize_until: int | None = None) -> list[SegmentText]:
        """Finals due without a decode: held words whose wait is over (when finalizing, at once).

        The wait ends after `hold_s` of silence in the audio or, should the audio stop coming,
        `hold_s` of wall-clock time after it was first asked about here. Speech that began only
        after `hold_s` of silence does not keep them (however late their own decode came back).
        """
        if self._held:
            if self._held_deadline is None:
                self._held_deadline = now + self.hold_s
            # Finalizing: they are final now, unless speech inside what is being finalized follows
            # them (its decode, due next, hears them again with what follows).
            finalizing = finalize_until is not None and (not self._regions or self._regions[0].start >= finalize_until)
            waited = now >= self._held_deadline or self.received >= self._held_until
            resumed_late = bool(self._regions) and self._regions[0].onset >= self._held_until
            if finalizing or (waited and (not self._regions or resumed_late)):
                self._release_held()
        return self._take_due()

    def seconds_until_settle(self, now: float) -> float | None:
        """How long until held words become final by the clock (None: not waiting for the clock)."""
        if not self._held or self._held_deadline is None or self._regions:
            return None
        return max(0.0, self._held_deadline - now)

    def _window(self, start: int, end: int, kind: Literal["partial", "cap", "final"]) -> Window:
        audio = self._joined()[start - self._buffer_start : end - self._buffer_start]
        self.stats.windows[kind] += 1
        self.stats.longest_window = max(self.stats.longest_window, end - start)
        return Window(
            start,
            end,
            kind,
            audio,
            self._context,
            join_words(self._buffered_words),
            self._epoch,
            join_words(self._agreement.tail),
        )

    # -- results --------------------------------------------------------------------------------

    def accept(self, window: Window, result: TranscriptionResult | None) -> list[SegmentText]:
        """Take what the model heard in `window` (None: the decode failed) and say what to send."""
        out = self._take_due()
        if window.epoch != self._epoch or window.start != self._decode_start:
            return out  # a partial of audio that has been finalized or trimmed meanwhile
        words, language = self._heard(window, result)
        # The model continued after the committed words (it was made to begin with them): all its words are new.
        after_prefix = bool(window.prefix) and result is not None and result.after_prefix
        if self._held and window.is_final:
            new = self._agreement.fresh(words, after_prefix)
            if new and new[-1].end >= self._held[0].start:
                self._held = []  # heard again, with what follows: this decode's words replace them
            else:
                self._release_held()  # this decode did not hear them (no speech, say): they stand as heard
                out += self._take_due()
        if window.kind == "partial":
            if result is None:
                return out  # finals already due still go out
            self._last_partial_end = window.end
            self.transcribed = max(self.transcribed, window.end)
            if self._unheard_in_partial(window, words, after_prefix):
                self._decode_alone_from(self._regions[0].start)
                self._last_partial_at = -math.inf  # the next partial hears it alone, at once
                return out + self._take_due()
            heard_until = window.end / MODEL_SAMPLE_RATE
            confirmed = self._agreement.insert(words, after_prefix, heard_until)
            if confirmed:
                self._held = []  # two decodes agreed on what follows the finals: the hold is over
            elif self._held and heard_until >= self._agreement.settled_at(self._held):
                confirmed = self._settle_held()
            elif self._held and (alike := self._held_heard_alike(window.end)):
                self._held, self._held_deadline = [], None
                confirmed = self._agreement.commit_head(alike)
            out += self._final(confirmed, language, window.end)
            if window.end - self._decode_start > self.trim_samples and self._buffered_words:
                self._trim_to(self._trim_point())
            if self.interim_results and self._agreement.tail:
                out.append(self._segment(self._agreement.tail, False, language, window.end))
            return out
        if window.kind == "cap":
            cutoff = window.end / MODEL_SAMPLE_RATE - CAP_HOLD_BACK_S
            committed = self._agreement.commit_until(words, cutoff, after_prefix)
            out += self._final(committed, language, window.end)
            target = self._sample(committed[-1].end) if committed else 0
            if target < self._decode_start + MIN_CAP_PROGRESS_S * MODEL_SAMPLE_RATE:
                target = self._sample(cutoff)  # nothing (or too little) confirmed: move on regardless
            self._trim_to(target)
            self.transcribed = max(self.transcribed, self._decode_start)
            return out
        if self._cut_from is not None and self._cut is not None and window.end >= self._cut:
            committed = self._agreement.finish(words, after_prefix, None)
            out += self._cut_finals(committed, language, window)
            self.transcribed = max(self.transcribed, window.end)
            self._finish_region(window.end)
            return out
        restart = self._unheard_from(window, words, after_prefix)
        if restart is not None:  # the model stopped early: what it heard is final, the rest is heard again
            committed = self._agreement.finish(words, after_prefix, None)
            out += self._final(committed, language, window.end)
            self._decode_alone_from(restart)
            return out + self._take_due()
        committed = self._agreement.finish(words, after_prefix, self._hold_from(window), window.end / MODEL_SAMPLE_RATE)
        held = self._agreement.tail
        if held and self._carry_start(window.end, [*self._buffered_words, *committed], held) is None:
            self._agreement.commit(held)  # no audio to hear them again with: they cannot wait
            committed, held = committed + held, []
        out += self._final(committed, language, window.end)
        self.transcribed = max(self.transcribed, window.end)
        speech_end = self._regions[0].speech_end
        self._finish_region(window.end, held)
        if held:
            self._agreement.tail = held
            self._held, self._held_language, self._held_deadline = held, language, None
            assert speech_end is not None  # only an utterance the detector ended holds words (_hold_from)
            self._held_until = speech_end + self.hold
            self._floor = min(self._floor, self._sample(held[0].start))
            if self.interim_results:
                out.append(self._segment(held, False, language, window.end))
        return out

    def _unheard_from(self, window: Window, words: list[Word], after_prefix: bool) -> int | None:
        """Where speech that the final decode of an utterance did not transcribe begins, when
        there is at least `UNHEARD_SPEECH_S` of it (None: the decode heard it all, as far as the
        voice activity tells).

        Whisper may end its text at a pause: given the previous utterance as the prefix, it can
        take the speech after the pause for something already said and stop, and then the new
        utterance would have no words at all. A decode of the utterance on its own that hears
        nothing is believed: the voice activity was not speech.
        """
        if not self._regions:
            return None
        region = self._regions[0]
        if (region.end is not None and window.end < region.end) or self._heard_again >= MAX_HEARD_AGAIN:
            return None
        # An utterance still going on (cut by a flush) is speech up to the end of the window.
        speech_end = window.end if region.speech_end is None else min(region.speech_end, window.end)
        new = self._agreement.fresh(words, after_prefix)
        if new:
            restart = max(self._sample(new[-1].end), region.start)
        elif window.start < region.start:
            restart = region.start
        else:
            return None
        if restart <= window.start or speech_end - restart < UNHEARD_SPEECH_S * MODEL_SAMPLE_RATE:
            return None
        return restart

    def _unheard_in_partial(self, window: Window, words: list[Word], after_prefix: bool) -> bool:
        """Whether a partial decoded after the previous utterance heard none of the speech that
        followed it, though there has been `UNHEARD_SPEECH_S` of it after its pre-roll."""
        if not self._regions or window.start >= self._regions[0].start:
            return False
        region_start = self._regions[0].start
        if window.end - region_start < self.pad + UNHEARD_SPEECH_S * MODEL_SAMPLE_RATE:
            return False
        new = self._agreement.fresh(words, after_prefix)
        return not new or self._sample(new[-1].end) <= region_start + self.pad

    def _decode_alone_from(self, sample: int) -> None:
        """Everything before `sample` is final (held words as they were heard): the utterance
        goes on from there without the previous one's audio, whose words become the prompt."""
        self.stats.heard_again += 1
        self._heard_again += 1
        if self._held:
            self._release_held()
        self._agreement.reset_tail()
        self._floor = max(self._floor, sample)
        self._add_context(self._buffered_words)
        self._buffered_words = []
        self._carry_end = None
        if self._regions:
            self._regions[0].start = max(self._regions[0].start, sample)
        self._set_decode_start(sample)

    def _cut_finals(self, words: list[Word], language: str | None, window: Window) -> list[SegmentText]:
        """The last decode of a stream cut in mid-utterance. Its words from before the utterance
        (held from the previous one) are one final, the utterance's another; a client resending
        the audio from the utterance's start to a new session replaces every final of the
        utterance with what that session hears: a whole utterance, from a pause, is heard as well
        there as here, where a piece of one would lose the words at its edges."""
        assert self._cut_from is not None
        start = self._cut_from / MODEL_SAMPLE_RATE
        before = 0
        while before < len(words) and words[before].start < start:
            before += 1
        out = self._final(words[:before], language, window.end)
        out += self._final(words[before:], language, window.end)
        # The finals whose words begin in the audio to be resent are replaced. Should the last one kept
        # have a word there too (held words finalized with what followed), the resent audio begins
        # after it instead, so that no word is heard twice.
        resume_id, resume_s = self.segment_id, start
        for segment_id, first, last_start, last_end in reversed(self._recent_finals):
            if first < start:
                if last_start >= start:
                    resume_s = last_end
                break
            resume_id = segment_id
        sample = min(max(self._sample(resume_s), 0), window.end)
        self._resume = Resume(resume_id, sample)
        return out

    def _hold_from(self, window: Window) -> float | None:
        """Where the words held back after this final window start (None: hold nothing).

        Only a final that closes an utterance by voice activity holds its words, and only when a
        following utterance could still be decoded with it (the pause may yet be short).
        """
        if self.hold <= 0 or self.context_audio <= 0 or not self._regions:
            return None
        region = self._regions[0]
        if region.end is None or window.end < region.end:
            return None  # cut short by a flush or the end of the stream: everything is final now
        if len(self._regions) > 1 and self._regions[1].start - window.end > self.context_gap:
            return None
        # After the previous utterance's audio, the words of this one are those mostly after the
        # middle of the pause between them (Whisper times a word at the edge of a pause across it).
        previous_end = self._previous_speech_end
        if previous_end is not None and window.start < region.start and previous_end < region.onset:
            return (previous_end + region.onset) / 2 / MODEL_SAMPLE_RATE
        return region.start / MODEL_SAMPLE_RATE

    def _held_heard_alike(self, heard_until: int) -> int:
        """How many words the held ones are, when this partial, having heard `HELD_ALIKE_S` of the
        speech after its pre-roll, heard them again word for word where they were and went on
        after them (0 otherwise, and when the model was unsure of one of them either time: two
        decodes that heard little after a word can agree on the same wrong reading of it)."""
        if not self._regions or heard_until < self._regions[0].start + self.pad + HELD_ALIKE_S * MODEL_SAMPLE_RATE:
            return 0
        held, tail = self._held, self._agreement.tail
        if len(tail) <= len(held) or any(map(unsure, [*held, *tail[: len(held)]])):
            return 0  # a word the model was unsure of waits for its settle age (_settle_held)
        for old, new in zip(held, tail, strict=False):
            if old.text != new.text or abs(old.end - new.end) > HELD_SLACK_S:
                return 0
        return len(held)

    def _settle_held(self) -> list[Word]:
        """Held words that a partial has heard again with their settle age of what follows, and that
        two decodes have still not agreed on: they become final as this decode heard them, so
        that a hold never keeps them from a final for longer than that (the partials of a sentence
        that goes on may keep disagreeing about its later words)."""
        held, self._held, self._held_deadline = self._held, [], None
        tail = self._agreement.tail
        count = 0
        while count < len(tail) and tail[count].end <= held[-1].end + HELD_SLACK_S:
            count += 1
        if count:
            return self._agreement.commit_head(count)
        # This decode did not hear them again: they stand as first heard, and nothing of this
        # decode that overlaps them may follow.
        self._agreement.commit(held)
        self._agreement.tail = [w for w in tail if w.start >= held[-1].end]
        return held

    def _release_held(self) -> None:
        """The held words become final as they were heard."""
        words, self._held, self._held_deadline = self._held, [], None
        self._agreement.commit(words)
        if words:
            self._due += self._final(words, self._held_language, self.transcribed)

    def _take_due(self) -> list[SegmentText]:
        due, self._due = self._due, []
        return due

    def _heard(self, window: Window, result: TranscriptionResult | None) -> tuple[list[Word], str | None]:
        """The words of a result in session time, with the guards applied."""
        if result is None:
            return [], None
        judged = verdict(result.text, result.avg_logprob, result.no_speech_prob, self.guards)
        if judged != "speech":
            if judged == "no_speech":
                self.stats.dropped_no_speech += 1
            else:
                self.stats.dropped_degenerate += 1
                self._context = ""
            return [], result.language
        offset = window.start / MODEL_SAMPLE_RATE
        limit = window.end / MODEL_SAMPLE_RATE
        words = [w.shifted(offset) for w in result.words if w.text.strip()]
        words = [w.placed(min(w.start, limit), min(w.end, limit)) for w in words]
        if result.after_prefix:  # what follows the committed words lies after everything already final
            floor = self._floor / MODEL_SAMPLE_RATE
            words = [w.placed(max(w.start, floor), max(w.end, floor)) for w in words]
        cut = loop_start([w.key for w in words])
        if cut is not None:  # keep what came before the loop; never let the loop into the prompt
            self.stats.loops_cut += 1
            words = words[:cut]
            self._context = ""
            self._agreement.reset_tail()
        return words, result.language

    def _final(self, words: list[Word], language: str | None, covered: int) -> list[SegmentText]:
        if not words:
            return []
        segment = self._segment(words, True, language, covered)
        self._buffered_words += segment.words
        self._recent_finals.append((segment.segment_id, segment.start, segment.words[-1].start, segment.end))
        self.segment_id += 1
        return [segment]

    def _segment(self, words: Sequence[Word], is_final: bool, language: str | None, covered: int) -> SegmentText:
        """`covered`: the sample up to which the audio has been transcribed (for the lag)."""
        timed: list[Word] = []
        previous_end = self._last_word_end
        for word in words:  # word times only ever move forward
            start = max(word.start, previous_end)
            end = max(word.end, start)
            timed.append(word.placed(start, end))
            previous_end = end
        if is_final:
            self._last_word_end = previous_end
        lag = max(0.0, (self.received - covered) / MODEL_SAMPLE_RATE)
        return SegmentText(
            self.segment_id,
            is_final,
            join_words(timed),
            timed[0].start,
            timed[-1].end,
            language,
            tuple(timed),
            round(lag, 3),
        )

    # -- buffer ---------------------------------------------------------------------------------

    def _trim_to(self, sample: int) -> None:
        """Move the decode start up to `sample` (a committed word's end); its words become context."""
        if sample <= self._decode_start:
            return
        limit = sample / MODEL_SAMPLE_RATE
        leaving = [w for w in self._buffered_words if w.end <= limit]
        self._buffered_words = [w for w in self._buffered_words if w.end > limit]
        self._add_context(leaving)
        self._set_decode_start(sample)

    def _finish_region(self, end: int, held: Sequence[Word] = ()) -> None:
        """Everything before `end` is final (but the `held` words); the first region ends there
        (or goes on after it).

        The utterance's audio (its last `context_audio` seconds, from a word boundary) and its
        committed words stay as the start of the next decodes while the pause is short, so the
        next utterance is decoded as the continuation of the sentence it belongs to.
        """
        self._agreement.reset_tail()
        self._floor = max(self._floor, end)
        self._heard_again = 0
        region = self._regions[0]
        if region.end is not None and end >= region.end:
            self._previous_speech_end = region.speech_end
            self._regions.popleft()
            if self._regions:
                self._regions[0].start = max(self._regions[0].start, end)
        else:
            region.start = end
        carry = self._carry_start(end, self._buffered_words, held)
        if self._regions and self._regions[0].start - end > self.context_gap:
            carry = None  # the next utterance is already known to come after a long pause
        if carry is not None:
            self._trim_to(carry)
            self._epoch += 1  # nothing decoded before this point may be accepted now
            self._carry_end = None if self._regions else end
            if not self._regions:
                self.transcribed = max(self.transcribed, end)
            return
        self._add_context(self._buffered_words)
        self._buffered_words = []
        self._carry_end = None
        if self._regions:
            self._set_decode_start(self._regions[0].start)
        else:
            self._set_decode_start(end)
            self.transcribed = max(self.transcribed, end)
            self._drop_audio_before(max(end, self.received - self.pad))

    def _carry_start(self, end: int, committed: Sequence[Word], held: Sequence[Word] = ()) -> int | None:
        """Where the audio kept as context would start (the end of a committed word, before every
        held word), or None to keep none."""
        if self.context_audio <= 0 or not (committed or held):
            return None
        return self._kept_start(end - self.context_audio, [*committed, *held[:1]])

    def _trim_point(self) -> int:
        """Where a long buffer is cut: at the end of a committed word, keeping up to `keep` of the
        committed audio before the last committed word's end (those words stay the decodes' prefix).

        Cut right at the last committed word, the next decodes would start in the middle of a
        sentence with only its text as the prompt, and Whisper then often skips the words that
        follow the cut (base drops "I think" after "…a bunch of different words." in a clip of the
        accuracy corpus): with the audio of the sentence so far it continues it.
        """
        last = self._sample(self._buffered_words[-1].end)
        if self.keep <= 0:
            return last
        kept = self._kept_start(last - self.keep, self._buffered_words)
        return last if kept is None else kept

    def _kept_start(self, earliest: int, words: Sequence[Word]) -> int | None:
        """The earliest end of one of `words` (but the last) after which the next word starts at
        `earliest` or later: the buffer may start there with the words after it as the prefix.
        The current decode start if that is already after `earliest`; None if no word fits."""
        if self._decode_start >= earliest:
            return self._decode_start
        for previous, word in itertools.pairwise(words):
            if self._sample(word.start) >= earliest:
                return self._sample(previous.end)
        return None

    def _release_carry(self) -> None:
        """The pause went on: the kept utterance becomes text context only, and its audio goes."""
        if self._held:
            self._release_held()
        self._add_context(self._buffered_words)
        self._buffered_words = []
        self._carry_end = None
        self._set_decode_start(max(self._decode_start, self.received - self.pad))

    def _set_decode_start(self, sample: int) -> None:
        self._decode_start = sample
        self._epoch += 1
        self._last_partial_end = min(self._last_partial_end, sample)
        self._drop_audio_before(sample)

    def _add_context(self, words: Sequence[Word]) -> None:
        if not words or self.context_chars <= 0:
            return
        text = f"{self._context} {join_words(words)}".strip()
        if len(text) > self.context_chars:  # keep the most recent words that fit
            text = text[-self.context_chars :]
            text = text.partition(" ")[2] if " " in text else ""
        self._context = text

    def _joined(self) -> NDArray[np.float32]:
        if len(self._chunks) != 1:
            self._chunks = [np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.float32)]
        return self._chunks[0]

    def _drop_audio_before(self, sample: int) -> None:
        if sample <= self._buffer_start:
            return
        audio = self._joined()[sample - self._buffer_start :]
        self._chunks = [audio.copy()] if len(audio) else []
        self._buffer_start = sample

    @staticmethod
    def _sample(seconds: float) -> int:
        return round(seconds * MODEL_SAMPLE_RATE)
