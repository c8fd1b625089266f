"""Prometheus metrics for `/metrics`: what the engine and the sessions are doing right now.

Counters and histograms are updated where things happen (the engine's workers report each batch,
sessions report what they send). Values that are a state rather than an event (open sessions,
queue depth, the worst lag, the recent real-time factor) are read from the live objects at scrape
time by a collector, so they can never drift from the truth.

Each app owns its registry, so several apps in one process (tests) do not collide. With several
gunicorn workers, each worker answers for itself; see README.md ("Metrics").
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from real_time_audio.service import BatchReport

RTF_WINDOW_S = 60.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
LAG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(slots=True, frozen=True)
class LiveState:
    """Callables that read the server's state at scrape time."""

    sessions: Callable[[], int]
    rest_requests: Callable[[], int]
    echo_sessions: Callable[[], int]
    queue_depth: Callable[[], tuple[int, int]]  # finals, partials
    worst_lag: Callable[[], float]
    partials_skipped: Callable[[], int]
    ready: Callable[[], bool]
    draining: Callable[[], bool]
    model: Callable[[], tuple[str, str, str, str]]  # model id, device, dtype, the model id asked for
    max_sessions: Callable[[], int]  # MAX_SESSIONS, or what was measured for `auto`
    active: Callable[[], int] = lambda: 0  # what counts against MAX_SESSIONS (sessions, uploads, echo loops)
    accepting: Callable[[], bool] = lambda: False  # /ready answers 200: new sessions are welcome


class Metrics:
    """The server's metrics, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        # process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds (Linux).
        ProcessCollector(registry=registry)
        self.batch_size = Histogram(
            "rta_batch_size", "Jobs per batched model call.", buckets=BATCH_BUCKETS, registry=registry
        )
        self.queue_wait = Histogram(
            "rta_queue_wait_seconds",
            "Time a transcription job waited in the queue before its batch started.",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference = Histogram(
            "rta_inference_seconds", "Wall time of one batched model call.", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.audio_decoded = Counter(
            "rta_audio_decoded_seconds",
            "Seconds of audio run through the model (re-decodes of a growing utterance count again).",
            registry=registry,
        )
        self.audio_received = Counter(
            "rta_audio_received_seconds", "Seconds of audio received from clients.", registry=registry
        )
        self.model_time = Counter(
            "rta_model_seconds", "Wall seconds the workers spent in model calls.", registry=registry
        )
        self.transcriptions = Counter("rta_transcriptions", "Transcription messages sent.", ["kind"], registry=registry)
        self.lag = Histogram(
            "rta_session_lag_seconds",
            "The `lag` of each transcription sent: received audio not yet covered by any text.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.decoded_again = Counter(
            "rta_speech_decoded_again",
            "Times a decode left a second or more of speech untranscribed (the model ended its text early) "
            "and that speech was decoded again on its own.",
            registry=registry,
        )
        self.preempted = Counter(
            "rta_partials_preempted",
            "Partial decodes stopped part-way so that a final could have their worker at once.",
            registry=registry,
        )
        self.errors = Counter("rta_errors", "Error messages sent to clients, by code.", ["code"], registry=registry)
        self.sessions_ended = Counter(
            "rta_sessions_ended", "Sessions that ended, by final status.", ["status"], registry=registry
        )
        self._recent: deque[tuple[float, float, float]] = deque()  # (time, model s, audio s)
        self._lock = threading.Lock()

    def watch(self, state: LiveState) -> None:
        """Report the live state at every scrape."""
        self.registry.register(_LiveCollector(state, self))

    def observe_batch(self, report: BatchReport) -> None:
        """Called by an engine worker after each model call (any thread)."""
        self.batch_size.observe(report.size)
        self.inference.observe(report.seconds)
        for wait, kind in zip(report.queue_waits, report.kinds, strict=True):
            self.queue_wait.labels(kind).observe(wait)
        self.model_time.inc(report.seconds)
        audio = 0.0 if report.preempted else report.audio_seconds  # stopped part-way: none of it was decoded
        if report.preempted:
            self.preempted.inc(report.size)
        self.audio_decoded.inc(audio)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, report.seconds, audio))
            self._expire(now)

    def real_time_factor(self) -> float:
        """Model seconds per second of audio decoded over the last minute (0 when idle)."""
        with self._lock:
            self._expire(time.monotonic())
            model = sum(item[1] for item in self._recent)
            audio = sum(item[2] for item in self._recent)
        return model / audio if audio else 0.0

    def _expire(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RTF_WINDOW_S:
            self._recent.popleft()

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def sent(self, is_final: bool, lag: float) -> None:
        self.transcriptions.labels("final" if is_final else "partial").inc()
        self.lag.observe(lag)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    def __init__(self, state: LiveState, metrics: Metrics) -> None:
        self.state = state
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        state = self.state
        yield _gauge("rta_active_sessions", "Open WebSocket transcription sessions.", state.sessions())
        yield _gauge("rta_active_rest_requests", "POST /v1/audio/transcriptions in progress.", state.rest_requests())
        yield _gauge("rta_active_echo_sessions", "Open /ws/echo loops.", state.echo_sessions())
        yield _gauge(
            "rta_max_sessions",
            "Sessions this process takes at once (MAX_SESSIONS, or measured at start-up for auto).",
            state.max_sessions(),
        )
        limit = state.max_sessions()
        yield _gauge(
            "rta_session_load",
            "Session slots in use: open sessions, uploads and echo loops over the session limit (1 = full).",
            state.active() / limit if limit else 1.0,
        )
        yield _gauge(
            "rta_accepting_sessions",
            "1 while /ready answers 200 (0 while loading, full, draining, or with a dead engine).",
            float(state.accepting()),
        )
        yield _gauge("rta_threads", "Threads in this process.", threading.active_count())
        finals, partials = state.queue_depth()
        depth = GaugeMetricFamily("rta_queue_depth", "Jobs waiting for a worker, by kind.", labels=["kind"])
        depth.add_metric(["final"], finals)
        depth.add_metric(["partial"], partials)
        yield depth
        yield _gauge(
            "rta_session_lag_max_seconds", "The largest lag among open sessions (last text sent).", state.worst_lag()
        )
        yield _gauge(
            "rta_real_time_factor",
            "Model seconds per second of audio decoded, over the last minute (below 1 keeps up).",
            self.metrics.real_time_factor(),
        )
        yield CounterMetricFamily(
            "rta_partials_skipped",
            "Partial transcriptions skipped because the queue was full.",
            value=state.partials_skipped(),
        )
        yield _gauge("rta_engine_ready", "1 when the model is loaded and serving.", float(state.ready()))
        yield _gauge("rta_draining", "1 while the server shuts down gracefully.", float(state.draining()))
        model, device, dtype, requested = state.model()
        info = GaugeMetricFamily(
            "rta_model_info",
            "The model that serves, and the one TRANSCRIPTION_MODEL_ID asked for (value is always 1).",
            labels=["model", "device", "dtype", "requested_model"],
        )
        info.add_metric([model, device, dtype, requested], 1)
        yield info
        yield _gauge(
            "rta_model_fallback",
            "1 when the fallback model serves because the configured one could not be had.",
            float(bool(model) and model != requested),
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
