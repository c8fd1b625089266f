"""One session's way from bytes to text, whatever brought the bytes.

    bytes ─▶ record ─▶ decode ─▶ voice detection ─▶ streaming policy ─▶ engine request
                                                                              │
    messages ◀── finals kept in the record ◀── accepted words ◀── result ◀────┘

`SessionPipeline` holds everything one session owns on that way: its record on disk (the offline
`stt` command keeps none), its decoder, its voice detector and its streaming policy. It knows
nothing of WebSockets or HTTP. Its blocking
steps (the record, decoding, voice detection) are called from the session's own threads; one lock
orders them against `release`, after which they do nothing, so a thread that outlives a cancelled
await never touches a closed record or decoder.

Three drivers use it:
- the live WebSocket session (`handler.Session`): every decoded piece goes to the policy at once,
  partials included;
- an uploaded file (`POST /v1/audio/transcriptions`) and the offline `stt` command, through
  `RecordingTranscription`: a recording is transcribed as a live session without partials would
  transcribe it, fed one second at a time, so the result does not depend on how the bytes were cut.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from real_time_audio.audio.containers import ContainerDecoder
from real_time_audio.audio.pcm import MODEL_SAMPLE_RATE, SAMPLE_WIDTH, AudioDecoder, BadAudioError, PcmDecoder
from real_time_audio.audio.vad import FrameScorer, SpeechEvent, VoiceActivityDetector
from real_time_audio.messages import SessionConfig, Transcription, WordTiming
from real_time_audio.service import TranscriptionRequest, TranscriptionResult
from real_time_audio.storage.recorder import SessionRecorder
from real_time_audio.streaming.policy import SegmentText, UtterancePolicy, Window

if TYPE_CHECKING:
    from real_time_audio.config import Settings
    from real_time_audio.service import TranscriptionEngine

FEED_SAMPLES = MODEL_SAMPLE_RATE  # a recording reaches voice detection and the policy one second at a time
_NOTHING = np.zeros(0, dtype=np.float32)


@dataclass(slots=True)
class Decoded:
    """What one blocking step produced: audio, the voice activity found in it, and what went wrong."""

    samples: NDArray[np.float32] = field(default_factory=lambda: _NOTHING)
    events: list[SpeechEvent] = field(default_factory=list)
    problem: str | None = None  # a decoding problem (the samples before it are kept)
    fatal: bool = False  # ... that ends the session: the stream is hostile, nothing more is decoded
    storage: OSError | None = None  # the record could not be written (a full disk)


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


def final_record(segment: SegmentText) -> dict[str, Any]:
    """A final as one line of transcript.jsonl."""
    return transcription_message(segment).model_dump(exclude={"type", "is_final", "lag"})


def record_metadata(
    settings: Settings, engine: TranscriptionEngine, config: SessionConfig, client: Any, owner: str | None
) -> dict[str, Any]:
    """What session.json says about a new session: its config, the model serving it, its client
    (an ASGI `client` address) and, with API tokens, a digest of the token that opened it."""
    metadata: dict[str, Any] = {
        "config": config.wire(),
        "model": engine.model_id,
        "device": engine.device,
        "client": f"{client.host}:{client.port}" if client else None,
    }
    if owner is not None:
        metadata["owner"] = owner
    return metadata


def new_decoder(config: SessionConfig, settings: Settings) -> AudioDecoder:
    """The decoder for a session's encoding: raw PCM, or a container through FFmpeg."""
    if config.encoding in SAMPLE_WIDTH:
        return PcmDecoder(config.encoding, config.sample_rate, config.channels)
    return ContainerDecoder(
        config.encoding, max_sample_rate=settings.max_sample_rate, max_channels=settings.max_channels
    )


class SessionPipeline:
    """One session's record, decoder, voice detector and streaming policy; see the module docstring.

    Methods marked *blocking* run on the session's threads; the others on the event loop.
    """

    def __init__(
        self,
        settings: Settings,
        recorder: SessionRecorder | None,
        config: SessionConfig,
        vad_scorer: FrameScorer | None = None,
        *,
        session_id: str = "",
    ) -> None:
        self.settings = settings
        self.session_id = session_id
        self.recorder = recorder
        self.config = config
        self.policy = UtterancePolicy.from_settings(settings, config.interim_results)
        self._vad = VoiceActivityDetector.from_settings(vad_scorer, settings) if vad_scorer is not None else None
        self._decoder: AudioDecoder | None = None
        self.rejected: str | None = None  # a hostile stream was refused: why (nothing more is decoded)
        self.finals: list[str] = []  # the text of every final, in order
        self._lock = threading.Lock()
        self._released = False

    # -- configuration (event loop) ------------------------------------------------------------

    def configure(self, config: SessionConfig) -> None:
        """A new config before the first audio: the decoder is made for it at the first frame."""
        self.config = config
        if self._decoder is not None:
            self._decoder.close()
        self._decoder = None
        self.policy.interim_results = config.interim_results

    def check(self, frame: bytes) -> None:
        """Raise BadAudioError if this frame cannot be audio in the session's format (cheap: no decoding)."""
        if self._decoder is None:
            self._decoder = new_decoder(self.config, self.settings)
        self._decoder.check(frame)

    # -- audio (blocking) ------------------------------------------------------------------------

    def receive(self, frame: bytes, detect: bool = True) -> Decoded:
        """*Blocking.* Keep the bytes in the record, decode them, and (`detect`) find the voice activity.

        A container's problems show only while decoding, after the bytes were kept; the audio
        decoded before the problem still goes on, and the problem is returned for the client.
        """
        with self._lock:
            if self._released or self.rejected is not None:
                return Decoded()
            storage = None
            try:
                if self.recorder is not None:
                    config = self.config
                    self.recorder.write_audio(frame, config.encoding, config.sample_rate, config.channels)
            except OSError as exc:  # a full disk must not stop the transcription
                storage = exc
            if self._decoder is None:
                self._decoder = new_decoder(self.config, self.settings)
            decoded = self._decode(lambda: self._decoder.decode(frame) if self._decoder else _NOTHING, detect)
            decoded.storage = storage
            return decoded

    def more(self, detect: bool = True) -> Decoded:
        """*Blocking.* The decoder's next piece of audio (a container hands out at most PIECE_SAMPLES at a time)."""
        with self._lock:
            if self._released or self._decoder is None or self.rejected is not None:
                return Decoded()
            return self._decode(self._decoder.more, detect)

    def drain(self, end: bool, detect: bool = True) -> Decoded:
        """*Blocking.* The samples still inside the decoder; at the end of the stream (`end`) its first
        piece of what remains (`more` gives the rest)."""
        with self._lock:
            if self._released or self._decoder is None:
                return Decoded()
            decoder = self._decoder
            return self._decode(decoder.finish if end else decoder.drain, detect)

    def detect(self, samples: NDArray[np.float32]) -> list[SpeechEvent]:
        """*Blocking.* Voice activity in the next stretch of the session's audio."""
        with self._lock:
            if self._released:
                return []
            return self._detect(samples)

    def end_speech(self) -> list[SpeechEvent]:
        """*Blocking.* End of the audio: open speech ends at the last sample."""
        with self._lock:
            if self._released or self._vad is None:
                return []
            return self._vad.finish(self.policy.received)

    def _decode(self, step: Callable[[], NDArray[np.float32]], detect: bool) -> Decoded:
        try:
            samples, problem, fatal = step(), None, False
        except BadAudioError as exc:
            samples, problem = exc.salvaged, str(exc)
            fatal = exc.fatal and self.rejected is None
            if fatal:  # a hostile stream (a decompression bomb, an impossible format) ends the session
                self.rejected = problem
        return Decoded(samples, self._detect(samples) if detect else [], problem, fatal)

    def _detect(self, samples: NDArray[np.float32]) -> list[SpeechEvent]:
        return self._vad.process(samples) if self._vad is not None and len(samples) else []

    # -- the record (blocking) -----------------------------------------------------------------

    def record(self, action: Callable[..., object], *args: Any, **kwargs: Any) -> OSError | None:
        """*Blocking.* One action on the record unless the session has been released. A failed write
        (a full disk) is returned, not raised: transcription goes on without it."""
        with self._lock:
            if self._released or self.recorder is None:
                return None
            try:
                action(*args, **kwargs)
            except OSError as exc:
                return exc
            return None

    def keep_final(self, segment: SegmentText) -> OSError | None:
        """*Blocking.* Append a final to transcript.jsonl."""
        if self.recorder is None:
            return None
        return self.record(self.recorder.append_final, final_record(segment))

    def close_record(self, status: str) -> OSError | None:
        """*Blocking.* Close the record with its final status (the session goes on to say goodbye)."""
        return self.record(self._close_recorder, status)

    def stop_decoding(self) -> None:
        """Safe from any thread while another decodes: that decode returns at once, with nothing more."""
        decoder = self._decoder
        if decoder is not None:
            decoder.close()

    def release(self, status: str, before: Callable[[], None] | None = None) -> None:
        """*Blocking.* The end: run `before` (still able to write the record), close the record and
        stop the decoder. Every blocking step after this does nothing. Raises OSError if the record
        could not be closed."""
        decoder = self._decoder
        if decoder is not None:
            decoder.close()  # a decode running in another thread returns at once
        with self._lock:
            if before is not None:
                before()
            self._released = True
            if self._decoder is not None and self._decoder is not decoder:
                self._decoder.close()
            self._close_recorder(status)

    @property
    def released(self) -> bool:
        return self._released

    def _close_recorder(self, status: str) -> None:
        if self.recorder is not None and not self.recorder.closed:
            self.recorder.close(status, duration=round(self.duration, 3), segments=len(self.finals))

    @property
    def duration(self) -> float:
        """Seconds of audio received: from the byte count for PCM, from the decoded audio for containers."""
        config = self.config
        if config.encoding not in SAMPLE_WIDTH or self.recorder is None:
            return self.policy.received / MODEL_SAMPLE_RATE
        width = SAMPLE_WIDTH[config.encoding]
        return self.recorder.bytes_received / (config.sample_rate * config.channels * width)

    def resume_offset(self) -> tuple[int, float, int | None]:
        """After a shutdown cut the stream (`policy.cut`) and its finals are out: the first
        segment id a client resuming elsewhere replaces, the session second to resend from, and
        its byte offset in the audio received (raw PCM only; None for containers)."""
        resume = self.policy.resume
        seconds = resume.sample / MODEL_SAMPLE_RATE
        config = self.config
        if config.encoding not in SAMPLE_WIDTH or self.recorder is None:
            return resume.segment_id, round(seconds, 3), None
        received = self.recorder.bytes_received
        if resume.sample >= self.policy.received:
            return resume.segment_id, round(self.duration, 3), received
        frame = config.channels * SAMPLE_WIDTH[config.encoding]
        offset = min(round(seconds * config.sample_rate) * frame, received - received % frame)
        return resume.segment_id, round(offset / frame / config.sample_rate, 3), offset

    # -- transcription (event loop) ------------------------------------------------------------

    def feed(self, samples: NDArray[np.float32], events: list[SpeechEvent]) -> None:
        """Decoded audio and its voice activity, in order, to the streaming policy (with the pause
        the speaker is in, if any: a partial waits for what follows it)."""
        self.policy.feed(samples, events, self._vad.silent_since if self._vad is not None else None)

    def next_window(self, now: float, finalize_until: int | None = None) -> Window | None:
        return self.policy.next_window(now, finalize_until)

    def request(self, window: Window, session_prompt: str | None = None) -> TranscriptionRequest:
        """The engine request for a window: the session's prompt, then the text before the window."""
        prompt = " ".join(p for p in (session_prompt, window.context) if p) or None
        return TranscriptionRequest(
            audio=window.audio,
            language=self.config.language,
            task=self.config.task,
            prompt=prompt,
            prefix=window.prefix or None,
            draft=window.draft or None,
            is_final=window.is_final,
            session_id=self.session_id,
        )

    def accept(self, window: Window, result: TranscriptionResult | None) -> list[SegmentText]:
        """What the model heard in `window` (None: the decode failed or was skipped): the
        transcriptions to send, finals counted."""
        return self._counted(self.policy.accept(window, result))

    @property
    def decoded_again(self) -> int:
        """Times speech a decode left untranscribed was decoded again on its own (for `/metrics`)."""
        return self.policy.stats.heard_again

    def settle(self, now: float, finalize_until: int | None = None) -> list[SegmentText]:
        """Finals due without a decode (held words whose wait is over)."""
        return self._counted(self.policy.settle(now, finalize_until))

    def _counted(self, segments: list[SegmentText]) -> list[SegmentText]:
        self.finals += [segment.text for segment in segments if segment.is_final]
        return segments


class RecordingTranscription:
    """A whole recording through a session's pipeline, as a live session without partials.

    `add` queues decoded audio and `end` says no more will come; `advance` (blocking: voice
    detection runs there) moves the next second into the policy; `next_request` names the next
    window to decode and `accept` takes the engine's answer. `transcribe_ready` and
    `transcribe_ready_blocking` run that loop.
    """

    def __init__(self, pipeline: SessionPipeline) -> None:
        self.pipeline = pipeline
        self.policy = pipeline.policy
        self.policy.interim_results = False
        self.policy.hold_longest()  # a recording's finals have no latency to keep
        self.finals: list[FinalSegment] = []
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
        """*Blocking.* Feed the next second (at the end: the rest, and the end of speech) through
        voice detection into the policy; False when there is nothing to feed yet."""
        if self._ended:
            return False
        if self._queued_samples >= FEED_SAMPLES:
            chunk = self._take(FEED_SAMPLES)
        elif self._ending:
            chunk = self._take(self._queued_samples)
        else:
            return False
        self.pipeline.feed(chunk, self.pipeline.detect(chunk))
        if self._ending and not self._queued_samples:
            self._ended = True
            self.pipeline.feed(_NOTHING, self.pipeline.end_speech())
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
        return np.concatenate(pieces) if pieces else _NOTHING

    def next_request(self) -> TranscriptionRequest | None:
        """The next window to decode, or None until more audio has been fed."""
        assert self._window is None, "one job at a time: accept the previous result first"
        self._settle()
        # A recording is not shown while it is heard: without partials, only finals are due.
        window = self.pipeline.next_window(0.0, self.policy.received if self._ended else None)
        if window is None:
            return None
        self._window = window
        return self.pipeline.request(window, self.pipeline.config.prompt)

    def accept(self, result: TranscriptionResult) -> list[FinalSegment]:
        """Take the engine's result for the last request; returns the finals it settled."""
        window, self._window = self._window, None
        assert window is not None, "accept() without a request"
        self._last_decode = (window.start, result.avg_logprob, result.no_speech_prob)
        self._collect(self.pipeline.accept(window, result))
        return self.take_settled()

    def take_settled(self) -> list[FinalSegment]:
        """Finals settled since the last call (held words become final without a decode)."""
        self._settle()
        found, self._settled = self._settled, []
        return found

    def _settle(self) -> None:
        # The clock stands still here: held words wait for audio time (or the end of the recording).
        self._collect(self.pipeline.settle(0.0, self.policy.received if self._ended else None))

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
