"""Whole recordings through the live pipeline, with no connection in between.

A recording is transcribed as a live session without partial results would transcribe it: the
same voice-activity detection, the same streaming policy and the same engine. Audio goes in as
it is decoded; it is fed to the policy one second at a time, and after every second the windows
that are due (an utterance that ended, a buffer that is full) are decoded, one job at a time, so
memory stays bounded however long the recording is. The result does not depend on how the audio
was cut on its way in.

POST /v1/audio/transcriptions drives a `RecordingTranscription` with the server's engine
(`transcribe_ready`), the offline `stt` command with an engine of its own (`transcribe_ready_blocking`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from real_time_audio.audio.pcm import MODEL_SAMPLE_RATE
from real_time_audio.audio.vad import FrameScorer, VoiceActivityDetector
from real_time_audio.messages import Transcription, WordTiming
from real_time_audio.service import TranscriptionRequest, TranscriptionResult
from real_time_audio.streaming.policy import SegmentText, UtterancePolicy, Window

if TYPE_CHECKING:
    from real_time_audio.config import Settings
    from real_time_audio.service import TranscriptionEngine

FEED_SAMPLES = MODEL_SAMPLE_RATE  # audio reaches VAD and the policy in pieces of one second


@dataclass(slots=True, frozen=True)
class FinalSegment:
    """One final transcription and what the decode that produced it said about itself."""

    segment: SegmentText
    window_start: int  # first sample of the decoded window
    avg_logprob: float
    no_speech_prob: float | None


def transcription_message(segment: SegmentText) -> Transcription:
    """A partial or final as the wire protocol sends it (a final is also what transcript.jsonl keeps)."""
    return Transcription(
        segment_id=segment.segment_id,
        is_final=segment.is_final,
        text=segment.text,
        start=segment.start,
        end=segment.end,
        language=segment.language,
        lag=segment.lag,
        words=[WordTiming(word=w.text, start=w.start, end=w.end) for w in segment.words],
    )


class RecordingTranscription:
    """One recording on its way through VAD, the streaming policy and the engine.

    `add` queues decoded audio and `end` says no more will come; `advance` (blocking: VAD runs
    there) moves the next second into the policy; `next_request` names the next window to decode
    and `accept` takes the engine's answer. The drivers below run that loop.
    """

    def __init__(
        self,
        settings: Settings,
        vad_scorer: FrameScorer | None,
        *,
        language: str | None = None,
        task: str = "transcribe",
        prompt: str | None = None,
        session_id: str = "",
    ) -> None:
        self.language = language
        self.task = task
        self.prompt = prompt
        self.session_id = session_id
        self.policy = UtterancePolicy.from_settings(settings, interim_results=False)
        self.finals: list[FinalSegment] = []
        self._vad = VoiceActivityDetector.from_settings(vad_scorer, settings) if vad_scorer is not None else None
        self._queued: deque[NDArray[np.float32]] = deque()
        self._queued_samples = 0
        self._ending = False  # no more audio will be added
        self._ended = False  # ... and all of it is in the policy
        self._window: Window | None = None  # the window whose result is awaited
        self._settled: list[FinalSegment] = []  # finals due without a decode, not yet returned
        # The last decode's window start, avg_logprob and no_speech_prob (held words were heard there).
        self._last_decode: tuple[int, float, float | None] = (0, 0.0, None)

    @property
    def duration(self) -> float:
        """Seconds of audio in the policy so far."""
        return self.policy.received / MODEL_SAMPLE_RATE

    def add(self, samples: NDArray[np.float32]) -> None:
        """Queue decoded 16 kHz mono audio."""
        if len(samples):
            self._queued.append(samples)
            self._queued_samples += len(samples)

    def end(self) -> None:
        """No more audio: what is queued is the end of the recording."""
        self._ending = True

    def advance(self) -> bool:
        """Feed the next second (at the end: the rest, and the end of speech) through VAD into the
        policy; False when there is nothing to feed yet. Blocking: call it from a worker thread."""
        if self._ended:
            return False
        if self._queued_samples >= FEED_SAMPLES:
            chunk = self._take(FEED_SAMPLES)
        elif self._ending:
            chunk = self._take(self._queued_samples)
        else:
            return False
        events = self._vad.process(chunk) if self._vad is not None and len(chunk) else []
        self.policy.feed(chunk, events)
        if self._ending and not self._queued_samples:
            self._ended = True
            if self._vad is not None:
                self.policy.feed(np.zeros(0, dtype=np.float32), self._vad.finish(self.policy.received))
        return True

    def _take(self, count: int) -> NDArray[np.float32]:
        pieces: list[NDArray[np.float32]] = []
        needed = count
        while needed:
            head = self._queued[0]
            if len(head) <= needed:
                pieces.append(self._queued.popleft())
                needed -= len(head)
            else:
                pieces.append(head[:needed])
                self._queued[0] = head[needed:]
                needed = 0
        self._queued_samples -= count
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)

    def next_request(self) -> TranscriptionRequest | None:
        """The next window to decode, or None until more audio has been fed."""
        assert self._window is None, "one job at a time: accept the previous result first"
        while True:
            self._settle()
            window = self.policy.next_window(0.0, self.policy.received if self._ended else None)
            if window is None:
                return None
            if window.is_final:
                break
            # A recording is not shown while it is heard, so partials are of no use: the one the
            # policy offers is declined as a busy server would decline it.
            self.policy.accept(window, None)
        self._window = window
        prompt = " ".join(p for p in (self.prompt, window.context) if p) or None
        return TranscriptionRequest(
            audio=window.audio,
            language=self.language,
            task=self.task,
            prompt=prompt,
            prefix=window.prefix or None,
            is_final=True,
            session_id=self.session_id,
        )

    def accept(self, result: TranscriptionResult) -> list[FinalSegment]:
        """Take the engine's result for the last request; returns the finals it settled."""
        window, self._window = self._window, None
        assert window is not None, "accept() without a request"
        self._last_decode = (window.start, result.avg_logprob, result.no_speech_prob)
        self._collect(self.policy.accept(window, result))
        return self.take_settled()

    def take_settled(self) -> list[FinalSegment]:
        """Finals settled since the last call (held words become final without a decode)."""
        self._settle()
        found, self._settled = self._settled, []
        return found

    def _settle(self) -> None:
        # The clock stands still here: held words wait for audio time (or the end of the recording).
        self._collect(self.policy.settle(0.0, self.policy.received if self._ended else None))

    def _collect(self, segments: list[SegmentText]) -> None:
        found = [FinalSegment(segment, *self._last_decode) for segment in segments if segment.is_final]
        self.finals += found
        self._settled += found


async def transcribe_ready(
    job: RecordingTranscription, engine: TranscriptionEngine, threads: Executor | None = None
) -> list[FinalSegment]:
    """Feed everything that can be fed and decode what becomes due, awaiting the server's engine;
    returns the new finals. Call after `add`, and once more after `end`. Voice detection runs on
    `threads` (the caller's own, so that it never waits for a shared pool)."""
    found: list[FinalSegment] = []
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(threads, job.advance):
        while (request := job.next_request()) is not None:
            found += job.accept(await engine.transcribe(request))
        found += job.take_settled()
    return found


def transcribe_ready_blocking(job: RecordingTranscription, engine: TranscriptionEngine) -> list[FinalSegment]:
    """`transcribe_ready` for a caller without an event loop (the engine's own threads still decode)."""
    found: list[FinalSegment] = []
    while job.advance():
        while (request := job.next_request()) is not None:
            found += job.accept(engine.submit(request).result())
        found += job.take_settled()
    return found
