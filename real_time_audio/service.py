"""The transcription engine: one model per process, fed by a bounded priority queue and drained
by worker threads that batch jobs from many sessions into one model call.

This is the scheduler only, with the engine's own value types (requests, results, words, batch
reports). The model is a `Backend`; the Whisper one lives in `real_time_audio.whisper.backend`,
the only module that imports transformers. Nothing here imports torch, so importing this module
(and forking gunicorn workers) never touches CUDA. Metrics observe the engine through `on_batch`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import math
import threading
import time
import unicodedata
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from real_time_audio.audio.pcm import MODEL_SAMPLE_RATE

logger = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class Word:
    """One word and where it lies in the audio (seconds; from the start of a request's audio in a
    result, from the start of the session once the streaming policy has placed it)."""

    text: str
    start: float
    end: float
    # How sure the model was of the word: the probability of its least likely token (1.0 where
    # the backend does not say).
    probability: float = 1.0

    @property
    def key(self) -> str:
        """The word as compared between hypotheses: case and punctuation do not count."""
        folded = "".join(ch for ch in self.text.casefold() if not unicodedata.category(ch).startswith("P"))
        return folded.strip() or self.text.strip()

    def shifted(self, offset: float) -> Word:
        return self.placed(self.start + offset, self.end + offset)

    def placed(self, start: float, end: float) -> Word:
        """The same word, timed anew (rounded to the millisecond)."""
        return Word(self.text, round(start, 3), round(end, 3), self.probability)


@dataclass(slots=True, frozen=True)
class BatchReport:
    """What one worker did in one model call (handed to `TranscriptionEngine.on_batch`)."""

    size: int
    queue_waits: list[float]  # seconds each job waited before its batch started
    seconds: float  # wall time of the model call
    audio_seconds: float  # audio in the batch
    kinds: list[str]  # "final" or "partial", per job
    preempted: bool = False  # a batch of partials stopped for a final: its jobs got no result


@dataclass(slots=True, frozen=True)
class Capacity:
    """How many live sessions this engine keeps up with (MAX_SESSIONS=auto), and what it was measured on."""

    sessions: int
    batch: int  # the batch size with the best throughput
    call_seconds: float  # one model call of `batch` windows
    window_s: float
    interval_s: float  # PARTIAL_INTERVAL_MS: how often each session asks for a decode


# MAX_SESSIONS=auto: each live session asks for one decode of its current utterance every partial
# interval. Measured: model calls on windows of CAPACITY_WINDOW_S (a typical utterance buffer), each
# made to write CAPACITY_TOKENS_PER_S tokens per second of audio (English speech writes 2 to 3), at
# batch sizes 1, 2, 4 … up to BATCH_MAX_SIZE (stopping once a bigger batch gains under 10 % or one
# call takes CAPACITY_MAX_CALL_S). With the best rate R in windows per second and the interval I:
#     sessions = floor(CAPACITY_UTILISATION × R × I), at least 1 and at most QUEUE_MAX_SIZE.
# The headroom (1 − CAPACITY_UTILISATION) is for finals, feature extraction, decoding the audio and
# voice detection, which share the machine.
CAPACITY_WINDOW_S = 8.0
CAPACITY_TOKENS_PER_S = 3.0
CAPACITY_UTILISATION = 0.7
CAPACITY_MAX_CALL_S = 5.0
CAPACITY_MIN_GAIN = 1.1


def measure_capacity(
    measure: Callable[[float, int, int], float], interval_s: float, max_batch: int, limit: int
) -> Capacity:
    """Apply the rule above; `measure(window_s, rows, tokens)` times one model call."""
    tokens = round(CAPACITY_WINDOW_S * CAPACITY_TOKENS_PER_S)
    best_batch, best_seconds, best_rate = 1, 0.0, 0.0
    size = 1
    while size <= max_batch:
        seconds = max(measure(CAPACITY_WINDOW_S, size, tokens), 1e-6)
        rate = size / seconds
        if rate > best_rate:
            gain = rate / best_rate if best_rate else math.inf
            best_batch, best_seconds, best_rate = size, seconds, rate
            if gain < CAPACITY_MIN_GAIN:
                break
        else:
            break
        if seconds >= CAPACITY_MAX_CALL_S or size == max_batch:
            break
        size = min(size * 2, max_batch)
    sessions = max(1, min(limit, math.floor(CAPACITY_UTILISATION * best_rate * interval_s)))
    return Capacity(sessions, best_batch, best_seconds, CAPACITY_WINDOW_S, interval_s)


class EngineError(RuntimeError):
    """Base class of the engine's own errors."""


class QueueFullError(EngineError):
    """The queue is full; only partial jobs are ever refused this way."""


class EngineUnavailableError(EngineError):
    """The engine is stopped, still starting, or dead."""


class PartialPreemptedError(QueueFullError):
    """A partial job gave its worker up to a final that would otherwise have waited for it.

    Handled as a partial refused for load: the session skips it and spaces its partials wider.
    """


class Interrupted(Exception):
    """Raised by a backend that stops a batch because the engine asked it to (see `Backend`)."""


@dataclass(slots=True)
class TranscriptionRequest:
    """One piece of 16 kHz mono audio to transcribe, with the options that decide its batch."""

    audio: NDArray[np.float32]
    language: str | None = None
    task: str = "transcribe"
    prompt: str | None = None
    # Words already committed for the start of this audio: the decoder is made to begin with them
    # and only its continuation is returned, so it can neither revise nor repeat them.
    prefix: str | None = None
    # What the previous decode of this speech wrote after that prefix: a guess at the text that
    # lets the decoder check many tokens in one step. It changes the work, never the result.
    draft: str | None = None
    is_final: bool = True
    session_id: str = ""

    @property
    def batch_key(self) -> str:
        """Only jobs with equal keys share a model call; language and prompt may differ per row."""
        return self.task

    @property
    def duration(self) -> float:
        return len(self.audio) / MODEL_SAMPLE_RATE


@dataclass(slots=True)
class TranscriptionResult:
    """What the model heard in one request; word times are seconds from the start of its audio."""

    text: str
    language: str | None
    tokens: int
    truncated: bool = False
    words: list[Word] = field(default_factory=list)
    avg_logprob: float = 0.0
    no_speech_prob: float | None = None  # None: the model has no no-speech token
    after_prefix: bool = False  # the decoder began with the request's prefix: these words follow it


class Backend(Protocol):
    """What the engine needs from a model: one batched call, and some facts for the protocol."""

    model_id: str
    device: str
    languages: frozenset[str] | None  # None: any language the model detects

    def transcribe_batch(self, requests: Sequence[TranscriptionRequest]) -> list[TranscriptionResult]: ...


# A backend whose `transcribe_batch` also takes `interrupt` (a callable that turns true when the
# engine wants the worker back) and raises `Interrupted` soon after it does, and whose
# `preempt_partials` is true, lets a final take the worker of a batch of partials at once: on a
# CPU, where one decode holds a core for a third of a second, a final that finds every worker busy
# would otherwise wait for one of them.


def takes_interrupt(backend: Backend) -> bool:
    """Whether `backend.transcribe_batch` takes `interrupt` (see above)."""
    return "interrupt" in inspect.signature(backend.transcribe_batch).parameters


def is_fatal(exc: BaseException) -> bool:
    """Errors after which the device cannot be trusted (the process must be restarted)."""
    text = str(exc)
    return (
        "CUDA error" in text
        or "device-side assert" in text
        or "cuDNN error" in text
        or type(exc).__name__ == "AcceleratorError"
    )


# ---------------------------------------------------------------------------------------------
# Queue and engine


@dataclass(slots=True, eq=False)
class _Job:
    request: TranscriptionRequest
    future: concurrent.futures.Future[TranscriptionResult]
    enqueued_at: float = field(default_factory=time.monotonic)


class JobQueue:
    """Bounded, two-level queue: finals first, then partials, FIFO within each.

    Partials are refused once `maxsize` jobs wait. Finals are always accepted: each session has
    at most one job in the queue, so finals are bounded by the session limit and never dropped.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._finals: deque[_Job] = deque()
        self._partials: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._idle = 0  # workers waiting for a first job
        # Finals and partials never share a batch: on a CPU a batch costs about the sum of its rows,
        # so a final batched with partials would wait for them (set by the engine with `preempt`).
        self.separate_finals = False

    @property
    def idle(self) -> int:
        """Workers waiting for a job now (a final queued now starts at once when there is one)."""
        with self._ready:
            return self._idle

    def __len__(self) -> int:
        with self._ready:
            return len(self._finals) + len(self._partials)

    def depth(self) -> tuple[int, int]:
        with self._ready:
            return len(self._finals), len(self._partials)

    def put(self, job: _Job) -> None:
        with self._ready:
            if self._closed:
                raise EngineUnavailableError("the engine is shutting down")
            self._drop_cancelled()
            if job.request.is_final:
                self._finals.append(job)
            elif len(self._finals) + len(self._partials) >= self.maxsize:
                raise QueueFullError("transcription queue is full")
            else:
                self._partials.append(job)
            self._ready.notify()

    def _drop_cancelled(self) -> None:
        for jobs in (self._finals, self._partials):
            if any(j.future.cancelled() for j in jobs):
                live = [j for j in jobs if not j.future.cancelled()]
                jobs.clear()
                jobs.extend(live)

    def _pop(self, key: str | None, final: bool | None = None) -> _Job | None:
        """The first waiting job (finals first) with batch key `key`, of kind `final` (any: None)."""
        kinds = {None: (self._finals, self._partials), True: (self._finals,), False: (self._partials,)}[final]
        for jobs in kinds:
            for job in jobs:
                if key is None or job.request.batch_key == key:
                    jobs.remove(job)
                    return job
        return None

    def take_batch(self, max_size: int, wait_s: float) -> list[_Job] | None:
        """Block for a first job, then gather compatible jobs until one deadline or `max_size`.

        Returns None once the queue is closed and empty.
        """
        with self._ready:
            while not (self._finals or self._partials):
                if self._closed:
                    return None
                self._idle += 1
                try:
                    self._ready.wait()
                finally:
                    self._idle -= 1
            first = self._pop(None)
            assert first is not None
            batch = [first]
            key = first.request.batch_key
            kind = first.request.is_final if self.separate_finals else None
            deadline = time.monotonic() + wait_s
            while len(batch) < max_size:
                job = self._pop(key, kind)
                if job is not None:
                    batch.append(job)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._ready.wait(remaining)
            return batch

    def close(self) -> list[_Job]:
        """Refuse new jobs, wake every worker, and hand back the jobs that were still waiting."""
        with self._ready:
            self._closed = True
            left = list(self._finals) + list(self._partials)
            self._finals.clear()
            self._partials.clear()
            self._ready.notify_all()
            return left


STOPPED_SESSIONS_KEPT = 1024  # bounds the memory of which sessions' partials were stopped last


@dataclass(slots=True, eq=False)
class _Running:
    """The batch one worker is running: whether a final may take its worker, and the flag that asks."""

    partials_only: bool
    started: float
    sessions: frozenset[str] = frozenset()
    stop: threading.Event = field(default_factory=threading.Event)


@dataclass
class EngineStats:
    """Counters for tests, logs and (later) metrics. Updated by worker threads."""

    batches: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    jobs_completed: int = 0
    jobs_failed: int = 0
    jobs_dropped: int = 0  # their session left before a worker reached them
    partials_skipped: int = 0
    partials_preempted: int = 0  # stopped part-way so that a final could have their worker
    model_seconds: float = 0.0
    audio_seconds: float = 0.0


class TranscriptionEngine:
    """Owns the backend and the worker threads; sessions submit requests and await results."""

    def __init__(
        self,
        backend_factory: Callable[[], Backend],
        *,
        batch_max_size: int = 8,
        batch_wait_ms: float = 10,
        queue_max_size: int = 64,
        workers: int | None = 1,
        warmup: bool = True,
    ) -> None:
        self._backend_factory = backend_factory
        self.batch_max_size = batch_max_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.workers = workers  # None: as many as the backend asks for (its `workers`), else 1
        self.warmup = warmup
        self.queue = JobQueue(queue_max_size)
        self.stats = EngineStats()
        self.backend: Backend | None = None
        self.ready = False
        self.dead_reason: str | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.on_batch: Callable[[BatchReport], None] | None = None  # metrics; called by the workers
        self.capacity: Capacity | None = None  # measured (MAX_SESSIONS=auto)
        self.preempt = False  # finals may stop batches of partials (the backend's `preempt_partials`)
        self._running: dict[int, _Running] = {}  # per worker index, while it runs a batch
        self._stopped_last: set[str] = set()  # sessions whose latest partial was stopped for a final

    @property
    def model_id(self) -> str:
        return self.backend.model_id if self.backend else ""

    @property
    def device(self) -> str:
        return self.backend.device if self.backend else ""

    @property
    def requested_model(self) -> str:
        """TRANSCRIPTION_MODEL_ID as configured (differs from `model_id` when the fallback serves)."""
        return getattr(self.backend, "requested_model", None) or self.model_id

    @property
    def fallback_reason(self) -> str | None:
        reason: str | None = getattr(self.backend, "fallback_reason", None)
        return reason

    @property
    def dtype(self) -> str:
        """The weights' precision: `float32+int8` when the linear layers run quantized."""
        dtype = str(getattr(self.backend, "dtype", "")).removeprefix("torch.")
        quantization = getattr(self.backend, "quantization", None)
        return f"{dtype}+{quantization}" if quantization else dtype

    def queue_depth(self) -> tuple[int, int]:
        """Jobs waiting: (finals, partials)."""
        return self.queue.depth()

    @property
    def languages(self) -> frozenset[str] | None:
        return self.backend.languages if self.backend else None

    def start(self) -> None:
        """Load the model, warm it up, start the workers. Blocking: call from a thread."""
        self.backend = self._backend_factory()
        if self.warmup:
            started = time.perf_counter()
            noise = np.random.default_rng(0).standard_normal(MODEL_SAMPLE_RATE).astype(np.float32) * 0.01
            self.backend.transcribe_batch([TranscriptionRequest(audio=noise, session_id="warmup")])
            logger.info("warm-up inference took %.2f s", time.perf_counter() - started)
        if self.workers is None:
            self.workers = int(getattr(self.backend, "workers", 1))
        self.preempt = bool(getattr(self.backend, "preempt_partials", False)) and takes_interrupt(self.backend)
        self.queue.separate_finals = self.preempt
        for index in range(self.workers):
            thread = threading.Thread(target=self._worker, args=(index,), name=f"inference-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.ready = True

    def measure_capacity(self, interval_s: float, limit: int) -> Capacity:
        """How many live sessions this model keeps up with here (MAX_SESSIONS=auto). Blocking: call
        from a thread, after `start` and before sessions arrive (it runs the model directly)."""
        measure: Callable[[float, int, int], float] | None = getattr(self.backend, "measure", None)
        if measure is None:
            raise EngineError(f"MAX_SESSIONS=auto: the backend {self.model_id!r} cannot time itself")
        capacity = measure_capacity(measure, interval_s, self.batch_max_size, limit)
        self.capacity = capacity
        return capacity

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new jobs, cancel the waiting ones, and join the workers."""
        self.ready = False
        for job in self.queue.close():
            job.future.cancel()
        for thread in self._threads:
            thread.join(timeout_s)
            if thread.is_alive():
                logger.error("worker %s did not stop within %.0f s", thread.name, timeout_s)
        self._threads.clear()

    def submit(self, request: TranscriptionRequest) -> concurrent.futures.Future[TranscriptionResult]:
        """Queue a request; raises QueueFullError (partials only) or EngineUnavailableError."""
        if not self.ready:
            raise EngineUnavailableError(self.dead_reason or "the engine is not running")
        job = _Job(request, concurrent.futures.Future())
        try:
            self.queue.put(job)
        except QueueFullError:
            with self._lock:
                self.stats.partials_skipped += 1
            raise
        if request.is_final and self.preempt:
            self._make_room_for_final()
        return job.future

    def _make_room_for_final(self) -> None:
        """A final was queued. When no worker is free for it and no worker has been asked already
        for each final waiting, the batch of partials that started last (the least work lost) is
        asked to stop, and its worker takes the final next (finals are taken first)."""
        if self.queue.idle:
            return
        finals, _ = self.queue.depth()
        with self._lock:
            running = list(self._running.values())
            if sum(1 for r in running if r.stop.is_set()) >= finals:
                return
            # A session is never stopped twice in a row: under overload every partial could be.
            candidates = [
                r for r in running if r.partials_only and not r.stop.is_set() and not r.sessions & self._stopped_last
            ]
            if candidates:
                max(candidates, key=lambda r: r.started).stop.set()

    async def transcribe(self, request: TranscriptionRequest) -> TranscriptionResult:
        """Submit and await; cancelling the await cancels the job if no worker has started it."""
        return await asyncio.wrap_future(self.submit(request))

    def _worker(self, index: int = 0) -> None:
        prepare = getattr(self.backend, "prepare_worker", None)
        if prepare is not None:
            prepare()
        try:
            while (batch := self.queue.take_batch(self.batch_max_size, self.batch_wait_s)) is not None:
                live = [job for job in batch if job.future.set_running_or_notify_cancel()]
                with self._lock:
                    self.stats.jobs_dropped += len(batch) - len(live)
                if live:
                    started, waited = time.perf_counter(), time.monotonic()
                    running = _Running(
                        not any(job.request.is_final for job in live),
                        waited,
                        frozenset(job.request.session_id for job in live),
                    )
                    with self._lock:
                        self._running[index] = running
                    preempted = False
                    try:
                        preempted = self._run(live, running.stop if running.partials_only else None)
                    finally:
                        with self._lock:
                            del self._running[index]
                            if running.partials_only and not preempted:
                                self._stopped_last -= running.sessions
                            elif preempted:
                                if len(self._stopped_last) > STOPPED_SESSIONS_KEPT:  # sessions that left
                                    self._stopped_last.clear()
                                self._stopped_last |= running.sessions
                    if self.on_batch is not None:
                        self.on_batch(
                            BatchReport(
                                size=len(live),
                                queue_waits=[waited - job.enqueued_at for job in live],
                                seconds=time.perf_counter() - started,
                                audio_seconds=sum(job.request.duration for job in live),
                                kinds=["final" if job.request.is_final else "partial" for job in live],
                                preempted=preempted,
                            )
                        )
        except BaseException as exc:  # the worker itself broke: nothing can be trusted
            logger.exception("worker %s crashed", threading.current_thread().name)
            self._die(f"worker {threading.current_thread().name} crashed: {exc!r}")

    def _run(self, jobs: list[_Job], stop: threading.Event | None = None) -> bool:
        """Run one batch and settle its jobs' futures; True when it was stopped for a final."""
        assert self.backend is not None
        started = time.perf_counter()
        try:
            if stop is not None and takes_interrupt(self.backend):
                results = self.backend.transcribe_batch([job.request for job in jobs], interrupt=stop.is_set)  # type: ignore[call-arg]
            else:
                results = self.backend.transcribe_batch([job.request for job in jobs])
        except Interrupted:
            with self._lock:
                self.stats.partials_preempted += len(jobs)
                self.stats.model_seconds += time.perf_counter() - started  # spent, though nothing came of it
            for job in jobs:
                job.future.set_exception(PartialPreemptedError("a final took this partial's worker"))
            return True
        except Exception as exc:
            if len(jobs) > 1 and not is_fatal(exc):
                # One bad row must not fail its neighbours: run each job alone, so that only the
                # jobs that fail on their own get the error.
                logger.warning("batch of %d failed (%r); retrying its jobs one at a time", len(jobs), exc)
                for job in jobs:
                    if self.dead_reason is None:
                        self._run([job])
                        continue
                    with self._lock:  # an earlier retry found the device broken
                        self.stats.jobs_failed += 1
                    job.future.set_exception(EngineUnavailableError(self.dead_reason))
                return False
            if len(jobs) == 1:
                logger.exception("job of session %s failed", jobs[0].request.session_id)
            else:
                logger.exception("batch of %d failed", len(jobs))
            with self._lock:
                self.stats.jobs_failed += len(jobs)
            if is_fatal(exc):  # dead before anyone hears of the failure, so no one submits to it again
                self._die(f"device failure: {exc}")
            for job in jobs:
                job.future.set_exception(exc)
            return False
        elapsed = time.perf_counter() - started
        with self._lock:
            self.stats.batches += 1
            self.stats.batch_sizes[len(jobs)] += 1
            self.stats.jobs_completed += len(jobs)
            self.stats.model_seconds += elapsed
            self.stats.audio_seconds += sum(job.request.duration for job in jobs)
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)
        return False

    def _die(self, reason: str) -> None:
        """Mark the engine dead: /ready turns 503 and every waiting job fails."""
        if self.dead_reason is None:
            logger.critical("FATAL: transcription engine is dead: %s; restart the process", reason)
        self.dead_reason = reason
        self.ready = False
        for job in self.queue.close():
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(EngineUnavailableError(reason))
