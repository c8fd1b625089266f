"""A live stream replayed through the server's own session pipeline on a virtual clock.

Streaming at real-time pace through a server measures the machine as much as the policy: when a
decode finishes decides when the next partial is cut, so two runs of the same code on a busy
machine make different partials, and on long spontaneous clips a different word or two. That is
noise of a few words per run, more than some of the differences worth measuring.

Here the audio goes through `SessionPipeline` (decoder, voice detection, streaming policy) and the
server's Whisper backend in this process, as the WebSocket handler drives them, but time is a
counter: a 100 ms frame arrives every 100 ms of virtual time, and every decode takes `decode_s`
of it. Everything else is as served, so a run is the same every time (on one machine and thread
count) and two settings can be compared word for word.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from real_time_audio.messages import SessionConfig
from real_time_audio.pipeline import SessionPipeline
from real_time_audio.service import TranscriptionRequest, TranscriptionResult
from real_time_audio.streaming.policy import SegmentText

FRAME_S = 0.1
CLOCK_TICK_S = 1e-6  # a wait that rounds to nothing still takes this long


@dataclass(slots=True)
class Replayed:
    """What a client would have read: the finals in order, how many partials (and how many of them
    revised the one before), and when each final came (virtual seconds)."""

    finals: list[SegmentText] = field(default_factory=list)
    final_at: list[float] = field(default_factory=list)
    partials: int = 0
    revised: int = 0
    decodes: list[tuple[float, str]] = field(default_factory=list)  # when each decode began, and its kind

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.finals if s.text).strip()


def replay(
    pipeline: SessionPipeline,
    transcribe: Callable[[TranscriptionRequest], TranscriptionResult],
    pcm: bytes,
    decode_s: float,
) -> Replayed:
    """Stream `pcm` (the session's format) as 100 ms frames at real-time pace, then END, on a
    virtual clock; `transcribe` runs one request."""
    out = Replayed()
    previous: dict[int, list[str]] = {}
    frame = round(FRAME_S * pipeline.config.sample_rate) * 2 * pipeline.config.channels
    now = 0.0

    def take(segments: list[SegmentText], at: float) -> None:
        for segment in segments:
            words = segment.text.split()
            if segment.is_final:
                out.finals.append(segment)
                out.final_at.append(at)
                previous.pop(segment.segment_id, None)
                continue
            before = previous.get(segment.segment_id)
            if before is not None and words[: len(before)] != before:
                out.revised += 1
            previous[segment.segment_id] = words
            out.partials += 1

    frames = math.ceil(len(pcm) / frame)
    arrived = 0  # frames fed so far
    finalize: int | None = None  # END: everything received must be finalized
    policy = pipeline.policy
    while True:
        # The reader: every frame that has arrived by now is fed, and END right after the last one.
        while arrived < frames and (arrived + 1) * FRAME_S <= now:
            decoded = pipeline.receive(pcm[arrived * frame : (arrived + 1) * frame])
            pipeline.feed(decoded.samples, decoded.events)
            arrived += 1
        if arrived == frames and finalize is None:
            decoded = pipeline.drain(True)
            pipeline.feed(decoded.samples, decoded.events)
            while len((decoded := pipeline.more()).samples):
                pipeline.feed(decoded.samples, decoded.events)
            pipeline.feed(np.zeros(0, dtype=np.float32), pipeline.end_speech())
            finalize = policy.received
        # The transcriber (real_time_audio/handler.py): one decode at a time, each taking decode_s.
        take(pipeline.settle(now, finalize), now)
        window = pipeline.next_window(now, finalize)
        if window is not None:
            out.decodes.append((now, window.kind))
            result = transcribe(pipeline.request(window, None))
            now += decode_s
            if not window.is_final:
                policy.partial_round_trip(decode_s)
            take(pipeline.accept(window, result), now)
            continue
        if finalize is not None:
            return out
        due = (policy.seconds_until_partial(now), policy.seconds_until_settle(now), policy.seconds_until_tail(now))
        waits = [d for d in due if d is not None]
        wake = min(now + min(waits) if waits else math.inf, (arrived + 1) * FRAME_S)
        now = max(wake, now + CLOCK_TICK_S)  # time always moves on, as it does for the handler


def replay_pcm16(settings: Any, backend: Any, scorer: Any, audio: np.ndarray, decode_s: float) -> Replayed:
    """`audio` (16 kHz float) as 16-bit PCM through a new session with the default config."""
    pipeline = SessionPipeline(settings, None, SessionConfig(), scorer, session_id="replay")
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    return replay(pipeline, lambda request: backend.transcribe_batch([request])[0], pcm, decode_s)
