"""One `Session` per WebSocket connection: the transport around the session's pipeline.

The audio's way to text (record, decoding, voice detection, streaming policy, engine requests) is
the `SessionPipeline`'s; this module owns what is particular to a live connection. Two tasks run
per connection: `_receive` reads frames (with the idle and duration timers and back-pressure) and
answers control messages; `_transcribe` runs the pipeline's windows through the engine, at most
one job per session at a time, and sends what comes back. The only shared things are the engine
(which owns the model) and the storage folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
from numpy.typing import NDArray
from starlette import status
from starlette.websockets import WebSocket, WebSocketState

from real_time_audio.audio.containers import PIECE_SAMPLES
from real_time_audio.audio.pcm import MODEL_SAMPLE_RATE, BadAudioError
from real_time_audio.audio.vad import FrameScorer, SpeechEvent
from real_time_audio.config import Settings
from real_time_audio.messages import (
    CLOSE_IDLE,
    ConfigUpdate,
    EndMessage,
    ErrorCode,
    ErrorMessage,
    FlushMessage,
    KeepaliveMessage,
    ProtocolError,
    Recording,
    ResumePoint,
    ServerMessage,
    SessionConfig,
    SpeechEnded,
    SpeechStarted,
    StatusCompleted,
    StatusConfigured,
    StatusConnected,
    StatusFlushed,
    StatusShuttingDown,
    apply_config,
    parse_client_text,
    query_config,
    to_json,
)
from real_time_audio.ops.connection import ConnectionHooks
from real_time_audio.ops.metrics import Metrics
from real_time_audio.ops.security import owner_of
from real_time_audio.ops.tasks import stop_tasks
from real_time_audio.pipeline import Decoded, SessionPipeline, record_metadata, transcription_message
from real_time_audio.service import EngineUnavailableError, QueueFullError, TranscriptionEngine, TranscriptionResult
from real_time_audio.storage.layout import new_session_id
from real_time_audio.storage.recorder import SessionRecorder
from real_time_audio.streaming.policy import SegmentText, Window

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

RECORDER_TICK_S = 1.0
# Back-pressure never stops reading a socket for longer than this at a stretch (see _on_audio) ...
BACKPRESSURE_MAX_STALL_S = 5.0
# ... and the server's keepalive forgives a late pong this long after it last held a socket.
PONG_GRACE_S = 60.0
# On shutdown, frames already on their way are still read while they keep arriving this quickly ...
DRAIN_QUIET_S = 0.25
# ... but for no longer than this (a live microphone never goes quiet).
DRAIN_READ_S = 2.0


class ClientGone(Exception):
    """The client disconnected."""


class SessionClosed(Exception):
    """The server closed the session (the close frame has been sent)."""


@dataclass(slots=True)
class _Finalize:
    """A request to finalize all audio before `position` (samples): a flush or the end of stream."""

    kind: Literal["flush", "end", "drain", "reject"]
    position: int


class Session:
    """One client's live transcription session."""

    def __init__(
        self,
        websocket: WebSocket,
        engine: TranscriptionEngine,
        settings: Settings,
        query: dict[str, str] | None = None,
        vad_scorer: FrameScorer | None = None,
        metrics: Metrics | None = None,
        releases: set[asyncio.Future[None]] | None = None,
    ) -> None:
        self.ws = websocket
        # Where the final release of this session's record and decoder is registered while it runs
        # in the session's own thread, so that the server's shutdown can wait for it.
        self._releases = releases
        self._released_future: asyncio.Future[None] | None = None
        self._release_started: asyncio.Future[None] | None = None
        self.engine = engine
        self.settings = settings
        self.id = new_session_id()
        self.config = SessionConfig()
        self.log = logging.LoggerAdapter(logger, {"session_id": self.id})
        self._query = query or {}
        self._vad_scorer = vad_scorer
        self.pipeline: SessionPipeline | None = None  # made once the record exists
        self._recorder: SessionRecorder | None = None
        self._finalize: deque[_Finalize] = deque()
        self._wake = asyncio.Event()  # audio or a finalize request arrived
        self._progress = asyncio.Event()  # a final was produced, or the transcriber went idle
        self._transcriber_busy = False  # a decode is running or due: back-pressure may hold the reader
        self._send_lock = asyncio.Lock()
        self._ended = False
        self._audio_started = False
        self._status = "disconnected"
        self.metrics = metrics
        self.lag = 0.0  # of the last transcription sent
        self._draining = asyncio.Event()  # the server is shutting down: stop reading, finish, close 1001
        self._storage_failed = False
        self._holding_reads = False  # back-pressure: the reader is waiting for the transcriber
        self._reads_held_at = -math.inf  # loop time when back-pressure last let go
        self._connection = ConnectionHooks(websocket, self._reads_recently_held)
        # The session's own threads for its blocking work (the record, decoding, voice detection):
        # a session whose decoder is busy never holds a thread another session needs. Two, so that
        # the final release never waits behind a decode (it stops that decode instead).
        self._threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"session-{self.id[:8]}")
        self._client_gone = False  # the client left after END: finish the transcript without it
        self.before_close: Callable[[], None] | None = None  # called once, before the server closes

    def _leaving(self) -> None:
        """Just before the server closes the connection: give back the client's slots at once, so
        that a client reconnecting the moment it sees the close is not refused."""
        if self.before_close is not None:
            hook, self.before_close = self.before_close, None
            hook()

    async def _io(self, action: Callable[..., _T], *args: Any) -> _T:
        """Run blocking work on the session's own threads."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, functools.partial(action, *args))

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it ends, then release everything it held."""
        # Registered until the record is closed and the decoder stopped (the server's shutdown waits).
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._releases is not None:
            self._releases.add(done)
            done.add_done_callback(self._releases.discard)
        self._released_future = done
        try:
            await self._serve()
        finally:
            if self._release_started is None:  # it never got as far as the release (no record was made)
                self._threads.shutdown(wait=False)
                if not done.done():
                    done.set_result(None)

    async def _serve(self) -> None:
        query_error = self._configure_from_query()
        self._recorder = recorder = await self._io(
            SessionRecorder, self.settings.audio_storage_dir, self.id, self._metadata()
        )
        self.pipeline = SessionPipeline(self.settings, recorder, self.config, self._vad_scorer, session_id=self.id)
        self.log.info("session %s started (%s)", self.id, self.ws.client)
        tasks: set[asyncio.Task[None]] = set()
        try:
            await self._send(
                StatusConnected(
                    session_id=self.id, config=self.config.wire(), model=self.engine.model_id, device=self.engine.device
                )
            )
            if query_error:
                await self._send_error(query_error.code, query_error.message)
            if recorder.failure is not None:
                await self._storage_failure(recorder.failure)
            receiver = asyncio.create_task(self._receive(), name=f"receive-{self.id}")
            transcriber = asyncio.create_task(self._transcribe(), name=f"transcribe-{self.id}")
            tasks = {receiver, transcriber}
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raise what ended the session
            if transcriber not in done:  # draining: reading has stopped; the last finals are on their way
                await asyncio.wait({transcriber})
                transcriber.result()
        except (ClientGone, SessionClosed):
            pass
        except Exception:
            self.log.exception("session %s failed", self.id)
            self._status = "error"
            await self._close_with_error("internal", "internal server error", status.WS_1011_INTERNAL_ERROR)
        finally:
            for task in tasks:
                task.cancel()  # at once, before any await; stop_tasks below waits for them
            # Submitted at once, so the record is closed and the decoder stopped even if this task
            # is cancelled again while it waits.
            released = asyncio.get_running_loop().run_in_executor(self._threads, self._release)
            self._release_started = released
            released.add_done_callback(self._mark_released)
            self._threads.shutdown(wait=False)  # its threads end once the work queued is done
            if self.metrics is not None:  # before any await: this task may be cancelled while it waits
                self.metrics.sessions_ended.labels(self._status).inc()
            await stop_tasks(tasks)
            await asyncio.shield(released)
            self.log.info(
                "session %s ended: %s, %d bytes",
                self.id,
                self._status,
                recorder.bytes_received,
            )

    def _mark_released(self, _: object) -> None:
        if self._released_future is not None and not self._released_future.done():
            self._released_future.set_result(None)

    def _release(self) -> None:
        if self.pipeline is None:
            return
        try:
            self.pipeline.release(self._status)
        except OSError as exc:
            self.log.error("session %s: the record could not be closed: %s", self.id, exc)

    async def _persist(self, action: Callable[..., object], *args: Any) -> None:
        """One action on the record in a worker thread; a storage failure is reported to the client once."""
        assert self.pipeline is not None
        await self._report_storage(await self._io(self.pipeline.record, action, *args))

    async def _report_storage(self, problem: OSError | None) -> None:
        if problem is not None:
            await self._storage_failure(problem)

    async def _close_record(self) -> None:
        assert self.pipeline is not None
        await self._report_storage(await self._io(self.pipeline.close_record, self._status))

    async def _storage_failure(self, exc: OSError) -> None:
        self.log.error("session %s: writing the record failed: %s", self.id, exc)
        if self._storage_failed:
            return
        self._storage_failed = True
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        await self._send_error(
            "storage_full" if full else "internal",
            f"the recording could not be written ({exc.strerror or exc}); transcription goes on, "
            "but this session's audio and transcript may be incomplete on the server",
        )

    # -- shutdown -------------------------------------------------------------------------------

    def drain(self) -> None:
        """Server shutdown: stop reading, transcribe what was received, send its finals, close 1001."""
        self._draining.set()

    async def stop_now(self) -> None:
        """Close at once with 1001 (the drain ran out of time); the tasks then end on their own."""
        if self._status in ("completed", "server_shutdown"):
            return
        self._status = "server_shutdown"
        with contextlib.suppress(RuntimeError, OSError):
            await self._close(status.WS_1001_GOING_AWAY, "server shutting down")

    async def _close(self, code: int, reason: str | None = None) -> None:
        """Close the connection (if it is still open), giving back the client's slots first."""
        async with self._send_lock:
            if self.ws.application_state == WebSocketState.CONNECTED:
                self._leaving()
                await self.ws.close(code, reason)

    async def _close_for_shutdown(self) -> None:
        pipeline = self.pipeline
        assert pipeline is not None
        self._status = "server_shutdown"
        await self._close_record()
        segment_id, at, offset = pipeline.resume_offset()
        resume = ResumePoint(segment_id=segment_id, at=at, bytes=offset)
        with contextlib.suppress(ClientGone):
            await self._send(StatusShuttingDown(**self._summary(), resume=resume))
        self.log.info("session %s closed for shutdown after its last finals", self.id)
        await self._close(status.WS_1001_GOING_AWAY, "server shutting down")

    async def _close_rejected(self) -> None:
        """A hostile stream: its audio before the problem has been transcribed; close with 1007."""
        self._status = "bad_audio"
        await self._close_record()
        self.log.warning("session %s closed: %s", self.id, self.pipeline.rejected if self.pipeline else None)
        await self._close(status.WS_1007_INVALID_FRAME_PAYLOAD_DATA, "bad audio")

    def _reads_recently_held(self) -> bool:
        """Whether back-pressure held this socket lately: the client's pongs may still sit behind
        audio the server has not read yet, so a late pong does not mean a dead client."""
        return self._holding_reads or asyncio.get_running_loop().time() - self._reads_held_at < PONG_GRACE_S

    def _metadata(self) -> dict[str, Any]:
        owner = owner_of(self.settings, self.ws)  # with tokens: a digest of the one that opened the session
        return record_metadata(self.settings, self.engine, self.config, self.ws.client, owner)

    # -- configuration --------------------------------------------------------------------------

    def _configure_from_query(self) -> ProtocolError | None:
        """Apply config fields given in the URL; the error, if any, is sent after `connected`."""
        update = query_config(self._query)
        if not update:
            return None
        try:
            self._set_config(update)
        except ProtocolError as exc:
            return exc
        return None

    def _set_config(self, update: dict[str, Any]) -> None:
        config = apply_config(self.config, update)
        languages = self.engine.languages
        if config.language and languages is not None and config.language not in languages:
            raise ProtocolError("bad_config", f"language: {config.language!r} is not supported by this model")
        if config.task == "translate" and languages == frozenset({"en"}):
            raise ProtocolError("bad_config", "task: this English-only model cannot translate")
        self.config = config
        if self.pipeline is not None:
            self.pipeline.configure(config)

    # -- receiving ------------------------------------------------------------------------------

    async def _receive(self) -> None:
        """Read frames until the client leaves, the session idles out, or a frame is too large.

        Wakes at least once a second, even when nothing arrives, so that the audio on disk is never
        more than a second behind what was received. Returns (without an error) only when the
        server drains: the audio already read is then finalized and nothing more is read.
        """
        loop = asyncio.get_running_loop()
        pending: asyncio.Future[Any] | None = None
        draining = asyncio.ensure_future(self._draining.wait())
        idle_deadline = loop.time() + self.settings.idle_timeout_s
        end_deadline = loop.time() + self.settings.max_session_s if self.settings.max_session_s else None
        last_call: float | None = None  # while draining: read what is already on its way, until then
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(self.ws.receive())
                    idle_deadline = loop.time() + self.settings.idle_timeout_s
                if self._draining.is_set():
                    # The frames the client sent before the shutdown are still read (they may sit
                    # in socket buffers), as long as they keep coming quickly, for a short while.
                    last_call = last_call or loop.time() + DRAIN_READ_S
                    wait = min(DRAIN_QUIET_S, last_call - loop.time())
                    await asyncio.wait({pending}, timeout=max(0.0, wait))
                    if not pending.done():
                        break
                else:
                    wait = RECORDER_TICK_S
                    if not self._ended:
                        wait = min(wait, idle_deadline - loop.time())
                        if end_deadline is not None:
                            wait = min(wait, end_deadline - loop.time())
                    await asyncio.wait({pending, draining}, timeout=max(0.0, wait), return_when=asyncio.FIRST_COMPLETED)
                    if not pending.done():
                        await self._on_quiet(loop.time() >= idle_deadline, end_deadline)
                        idle_deadline = max(idle_deadline, self._connection.last_ping + self.settings.idle_timeout_s)
                        continue
                message, pending = pending.result(), None
                if message["type"] == "websocket.disconnect":
                    if self._ended:  # END, then gone: all the audio is here; its transcript is still made and kept
                        self._client_gone = True
                        break
                    raise ClientGone
                if message.get("bytes") is not None:
                    await self._on_audio(message["bytes"])
                    if self._rejected:
                        break  # a hostile stream: nothing more is read
                elif message.get("text") is not None:
                    await self._on_text(message["text"])
            if not self._ended:
                await self._request_finalize("reject" if self._rejected else "drain")
        finally:
            draining.cancel()
            if pending is not None:
                pending.cancel()

    async def _on_quiet(self, idle: bool, end_deadline: float | None) -> None:
        """Nothing arrived for a while: keep the record current, and apply the idle and duration limits."""
        assert self.pipeline is not None
        if self._draining.is_set():
            return
        recorder = self._recorder
        assert recorder is not None
        if recorder.has_unflushed_audio and not self._storage_failed:
            await self._persist(recorder.tick)
        if self._ended:
            return
        # A WebSocket ping counts as activity, like a keepalive message.
        if idle and asyncio.get_running_loop().time() >= self._connection.last_ping + self.settings.idle_timeout_s:
            self._status = "idle_timeout"
            await self._close_with_error("idle_timeout", f"no data for {self.settings.idle_timeout_s:g} s", CLOSE_IDLE)
            raise SessionClosed
        if end_deadline is not None and asyncio.get_running_loop().time() >= end_deadline:
            await self._send_error(
                "max_duration",
                f"the session reached the limit of {self.settings.max_session_s:g} s; "
                "the audio received so far is being finalized",
            )
            await self._end_stream()

    async def _on_audio(self, frame: bytes) -> None:
        if len(frame) > self.settings.max_frame_bytes:
            self._status = "frame_too_large"
            await self._close_with_error(
                "too_large",
                f"binary frame of {len(frame)} bytes exceeds the limit of {self.settings.max_frame_bytes} bytes",
                status.WS_1009_MESSAGE_TOO_BIG,
            )
            raise SessionClosed
        if self._ended:
            await self._send_error("bad_message", "audio after the end of stream is ignored")
            return
        pipeline = self.pipeline
        assert pipeline is not None
        try:
            pipeline.check(frame)
        except BadAudioError as exc:
            await self._send_error("bad_audio", str(exc))
            return
        self._audio_started = True  # the first accepted frame fixes the format
        decoded = await self._io(pipeline.receive, frame)
        await self._report_storage(decoded.storage)
        await self._take_decoded(decoded)

    @property
    def _rejected(self) -> bool:
        """A hostile stream ended the session."""
        return self.pipeline is not None and self.pipeline.rejected is not None

    async def _take_decoded(self, decoded: Decoded) -> None:
        """Feed the policy the decoded audio, one bounded piece at a time, with back-pressure after
        each, until the decoder has nothing more for now. A fatal problem ends the session."""
        assert self.pipeline is not None
        while True:
            await self._feed(decoded.samples, decoded.events)
            if decoded.problem:
                ending = "; the session ends: the audio before this point is transcribed and kept"
                await self._send_error("bad_audio", decoded.problem + (ending if decoded.fatal else ""))
                if self._rejected:
                    return
            await self._hold_reads()
            if len(decoded.samples) < PIECE_SAMPLES:
                return  # a piece short of full: the decoder has used everything it was given
            decoded = await self._io(self.pipeline.more)

    async def _hold_reads(self) -> None:
        """Back-pressure: above the cap, stop reading (TCP then slows the client) while the transcriber
        works through the backlog; reading goes on if it is idle (waiting for more audio to decode)."""
        assert self.pipeline is not None
        limit = self.settings.max_pending_audio_s * MODEL_SAMPLE_RATE
        while self.pipeline.policy.pending > limit and self._transcriber_busy and not self._draining.is_set():
            self._progress.clear()
            progress = asyncio.ensure_future(self._progress.wait())
            draining = asyncio.ensure_future(self._draining.wait())
            self._holding_reads = True
            try:
                done, _ = await asyncio.wait(
                    {progress, draining}, timeout=BACKPRESSURE_MAX_STALL_S, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                self._holding_reads = False
                self._reads_held_at = asyncio.get_running_loop().time()
                progress.cancel()
                draining.cancel()
            if not done:  # take one more frame now and then, so that control frames keep flowing
                break

    async def _feed(self, samples: NDArray[np.float32], events: list[SpeechEvent]) -> None:
        """Hand audio to the policy and tell the client where speech starts and ends."""
        assert self.pipeline is not None
        self.pipeline.feed(samples, events)
        self._wake.set()
        if self.metrics is not None and len(samples):
            self.metrics.audio_received.inc(len(samples) / MODEL_SAMPLE_RATE)
        for event in events:
            await self._send(SpeechStarted(at=event.at) if event.kind == "start" else SpeechEnded(at=event.at))

    async def _on_text(self, text: str) -> None:
        try:
            message = parse_client_text(text)
        except ProtocolError as exc:
            await self._send_error(exc.code, exc.message)
            return
        if self._ended:
            if not isinstance(message, KeepaliveMessage):  # a keepalive is harmless at any time
                await self._send_error("bad_message", "the stream has ended; only the final results follow")
            return
        if isinstance(message, ConfigUpdate):
            await self._on_config(message)
        elif isinstance(message, FlushMessage):
            await self._request_finalize("flush")
        elif isinstance(message, EndMessage):
            await self._end_stream()
        # keepalive: receiving it has already reset the idle timer

    async def _end_stream(self) -> None:
        """END from the client (or the session's time limit): finalize everything, then `completed`."""
        self._ended = True
        assert self.pipeline is not None
        recorder = self._recorder
        assert recorder is not None
        if recorder.bytes_received == 0:
            await self._persist(
                recorder.write_audio, b"", self.config.encoding, self.config.sample_rate, self.config.channels
            )
        await self._request_finalize("end")

    async def _on_config(self, message: ConfigUpdate) -> None:
        if self._audio_started:
            await self._send_error("bad_config", "config must come before the first audio frame")
            return
        try:
            self._set_config(message.model_dump(exclude_unset=True))
        except ProtocolError as exc:
            await self._send_error(exc.code, exc.message)
            return
        assert self._recorder is not None
        await self._persist(functools.partial(self._recorder.update_metadata, config=self.config.wire()))
        await self._send(StatusConfigured(config=self.config.wire()))

    async def _request_finalize(self, kind: Literal["flush", "end", "drain", "reject"]) -> None:
        pipeline = self.pipeline
        assert pipeline is not None
        if kind != "reject":  # a rejected stream is not decoded any further
            await self._take_decoded(await self._io(pipeline.drain, kind != "flush"))
        if kind == "drain":  # speech going on now is cut: its last words are kept apart for a resume
            pipeline.policy.cut(pipeline.policy.received)
        if kind != "flush":
            await self._feed(np.zeros(0, dtype=np.float32), await self._io(pipeline.end_speech))
        self._finalize.append(_Finalize(kind, pipeline.policy.received))
        self._wake.set()

    # -- transcribing ---------------------------------------------------------------------------

    async def _transcribe(self) -> None:
        """Run the policy: one job at a time; finals before flush/end acknowledgements."""
        pipeline = self.pipeline
        assert pipeline is not None
        while True:
            self._wake.clear()
            now = time.monotonic()
            marker = self._finalize[0] if self._finalize else None
            for segment in pipeline.settle(now, marker.position if marker else None):
                await self._send_segment(segment)
            window = pipeline.next_window(now, marker.position if marker else None)
            if window is not None:
                self._transcriber_busy = True
                await self._run_window(window)
                continue
            if marker is not None:
                self._finalize.popleft()
                if marker.kind == "flush":
                    await self._send(StatusFlushed())
                    continue
                if marker.kind == "drain":
                    await self._close_for_shutdown()
                    return
                if marker.kind == "reject":
                    await self._close_rejected()
                    return
                await self._complete()
                return
            policy = pipeline.policy
            waits = (
                policy.seconds_until_partial(now),
                policy.seconds_until_settle(now),
                policy.seconds_until_tail(now),
            )
            delays = [d for d in waits if d is not None]
            delay = min(delays) if delays else None
            if delay == 0:
                continue
            # Nothing due until more audio arrives: the reader must not wait for this transcriber.
            self._transcriber_busy = False
            self._progress.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _run_window(self, window: Window) -> None:
        assert self.pipeline is not None
        request = self.pipeline.request(window, self.config.prompt)
        result: TranscriptionResult | None = None
        asked = time.monotonic()
        try:
            result = await self.engine.transcribe(request)
            if not window.is_final:
                self.pipeline.policy.partial_round_trip(time.monotonic() - asked)
        except QueueFullError as exc:  # refused, or stopped for a final (PartialPreemptedError)
            self.log.debug("partial skipped: %s", exc)
            self.pipeline.policy.partial_round_trip(None)
        except EngineUnavailableError as exc:
            self._status = "engine_unavailable"
            await self._close_with_error(
                "internal", f"transcription engine unavailable: {exc}", status.WS_1011_INTERNAL_ERROR
            )
            raise SessionClosed from None
        except Exception as exc:
            span = f"{window.start / MODEL_SAMPLE_RATE:.2f}-{window.end / MODEL_SAMPLE_RATE:.2f} s"
            self.log.warning("%s decode of %s failed: %r", window.kind, span, exc)
            if window.is_final:  # a failed partial loses nothing: the next decode covers its audio
                await self._send_error(
                    "internal", f"the audio at {span} could not be transcribed; it is kept in the recording"
                )
        before = self.pipeline.decoded_again
        segments = self.pipeline.accept(window, result)
        if self.metrics is not None and self.pipeline.decoded_again > before:
            self.metrics.decoded_again.inc(self.pipeline.decoded_again - before)
        for segment in segments:
            await self._send_segment(segment)
        if window.is_final:
            self._progress.set()

    async def _send_segment(self, segment: SegmentText) -> None:
        message = transcription_message(segment)
        if segment.is_final:
            assert self.pipeline is not None
            await self._report_storage(await self._io(self.pipeline.keep_final, segment))
        self.lag = segment.lag
        if self.metrics is not None:
            self.metrics.sent(segment.is_final, segment.lag)
        await self._send(message)

    def _summary(self) -> dict[str, Any]:
        """The transcript and the recording, for `completed` and `shutting_down`."""
        pipeline, recorder = self.pipeline, self._recorder
        assert pipeline is not None and recorder is not None
        return {
            "session_id": self.id,
            "text": " ".join(t for t in pipeline.finals if t),
            "duration": round(pipeline.duration, 3),
            "segments": len(pipeline.finals),
            "recording": Recording(
                audio=f"/sessions/{self.id}/audio",  # where the API serves it; no server path
                bytes=recorder.bytes_received,
                sha256=recorder.sha256,
            ),
        }

    async def _complete(self) -> None:
        self._status = "completed"
        await self._close_record()
        await self._send(StatusCompleted(**self._summary()))
        if not self._client_gone:
            await self._close(status.WS_1000_NORMAL_CLOSURE)

    # -- sending --------------------------------------------------------------------------------

    async def _send(self, message: ServerMessage) -> None:
        if self._client_gone:
            return  # after END the client left: the transcript is finished for the record alone
        async with self._send_lock:
            if self.ws.application_state != WebSocketState.CONNECTED:
                raise ClientGone
            try:
                await self.ws.send_text(to_json(message))
            except (RuntimeError, OSError) as exc:  # the peer went away mid-send
                raise ClientGone from exc
            except Exception as exc:
                if type(exc).__name__ in ("WebSocketDisconnect", "ClientDisconnected"):
                    raise ClientGone from exc
                raise

    async def _send_error(self, code: ErrorCode, message: str) -> None:
        self.log.info("error %s: %s", code, message)
        if self.metrics is not None:
            self.metrics.error(code)
        await self._send(ErrorMessage(code=code, message=message))

    async def _close_with_error(self, code: ErrorCode, message: str, close_code: int) -> None:
        try:
            await self._send_error(code, message)
            await self._close(close_code)
        except (ClientGone, RuntimeError, OSError):
            pass
