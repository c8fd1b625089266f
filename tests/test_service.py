"""The engine: queue priorities, batching, cancellation, failures, and the real Whisper backend."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import operator
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from real_time_audio.config import Settings
from real_time_audio.service import (
    Capacity,
    EngineUnavailableError,
    Interrupted,
    JobQueue,
    PartialPreemptedError,
    QueueFullError,
    TranscriptionEngine,
    TranscriptionRequest,
    TranscriptionResult,
    _Job,
    measure_capacity,
)
from real_time_audio.whisper.backend import WhisperBackend, token_cap, worker_threads
from tests.conftest import speech_like


def request(
    seconds: float = 1.0, *, final: bool = True, language: str | None = None, session: str = "s"
) -> TranscriptionRequest:
    return TranscriptionRequest(
        audio=np.zeros(int(seconds * 16000), np.float32), language=language, is_final=final, session_id=session
    )


def job(req: TranscriptionRequest) -> _Job:
    return _Job(req, concurrent.futures.Future())


class RecordingBackend:
    """Test double: records each batch's sessions and answers with the session id as text."""

    model_id, device, languages = "fake", "cpu", None

    def __init__(self, delay_s: float = 0.0, fail_session: str | None = None, fatal: bool = False) -> None:
        self.delay_s = delay_s
        self.fail_session = fail_session
        self.fatal = fatal
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # a worker is inside the model (held at the gate while it is closed)

    def transcribe_batch(self, requests: Sequence[TranscriptionRequest]) -> list[TranscriptionResult]:
        self.entered.set()
        self.gate.wait()
        self.batches.append([r.session_id for r in requests])
        time.sleep(self.delay_s)
        if any(r.session_id == self.fail_session for r in requests):
            raise RuntimeError("CUDA error: an illegal memory access" if self.fatal else "bad batch")
        return [TranscriptionResult(text=r.session_id, language="en", tokens=1) for r in requests]


def engine_with(backend: RecordingBackend, **kw: object) -> TranscriptionEngine:
    options = {"batch_max_size": 8, "batch_wait_ms": 50, "queue_max_size": 4, "warmup": False} | kw
    engine = TranscriptionEngine(lambda: backend, **options)  # type: ignore[arg-type]
    engine.start()
    return engine


def test_finals_are_served_before_partials() -> None:
    """Finals jump ahead of partials that were queued earlier."""
    queue = JobQueue(maxsize=10)
    queue.put(job(request(final=False, session="p1")))
    queue.put(job(request(final=True, session="f1")))
    queue.put(job(request(final=False, session="p2")))
    queue.put(job(request(final=True, session="f2")))
    batch = queue.take_batch(max_size=10, wait_s=0)
    assert batch is not None
    assert [j.request.session_id for j in batch] == ["f1", "f2", "p1", "p2"]


def test_finals_and_partials_can_be_kept_in_separate_batches() -> None:
    """With `separate_finals` (the engine sets it where finals preempt partials) a batch holds
    finals only or partials only, so a final never waits for partials batched with it."""
    queue = JobQueue(maxsize=10)
    queue.separate_finals = True
    for session, final in [("p1", False), ("f1", True), ("p2", False), ("f2", True)]:
        queue.put(job(request(final=final, session=session)))
    batches = [queue.take_batch(max_size=10, wait_s=0) for _ in range(2)]
    assert [[j.request.session_id for j in b or []] for b in batches] == [["f1", "f2"], ["p1", "p2"]]


def test_full_queue_refuses_partials_but_never_finals() -> None:
    """At capacity a partial is refused (skipped); a final is still accepted."""
    queue = JobQueue(maxsize=2)
    queue.put(job(request(final=False)))
    queue.put(job(request(final=False)))
    with pytest.raises(QueueFullError):
        queue.put(job(request(final=False)))
    queue.put(job(request(final=True)))
    assert len(queue) == 3


def test_only_compatible_jobs_share_a_batch() -> None:
    """Languages and prompts may differ within a batch; another task waits for the next batch."""
    queue = JobQueue(maxsize=10)
    for session, language, task in [("a", "en", "transcribe"), ("b", "de", "translate"), ("c", "de", "transcribe")]:
        req = request(language=language, session=session)
        req.task = task
        queue.put(job(req))
    first = queue.take_batch(8, 0)
    second = queue.take_batch(8, 0)
    assert first is not None and second is not None
    assert [j.request.session_id for j in first] == ["a", "c"]
    assert [j.request.session_id for j in second] == ["b"]


def test_batch_waits_one_deadline_for_late_jobs() -> None:
    """A job arriving within the wait joins the first job's batch."""
    queue = JobQueue(maxsize=10)
    queue.put(job(request(session="early")))
    timer = threading.Timer(0.05, lambda: queue.put(job(request(session="late"))))
    timer.start()
    batch = queue.take_batch(8, wait_s=0.5)
    timer.join()
    assert batch is not None and [j.request.session_id for j in batch] == ["early", "late"]


def test_token_cap_is_proportional_to_duration() -> None:
    """Two seconds of audio may produce at most 2 × rate + allowance tokens, never 448."""
    assert token_cap(2.0, 6) == 20
    assert token_cap(0.1, 6) == 9
    assert token_cap(30.0, 6) == 188


def test_concurrent_submissions_are_batched() -> None:
    """Requests submitted together run as one batched call, and each gets its own result."""
    backend = RecordingBackend()
    backend.gate.clear()
    engine = engine_with(backend, queue_max_size=8)
    try:
        futures = [engine.submit(request(session=f"s{i}")) for i in range(5)]
        backend.gate.set()
        assert [f.result(timeout=10).text for f in futures] == [f"s{i}" for i in range(5)]
    finally:
        engine.stop()
    assert sorted(functools.reduce(operator.iadd, backend.batches, [])) == [f"s{i}" for i in range(5)]
    assert max(len(b) for b in backend.batches) >= 4
    assert engine.stats.jobs_completed == 5


def test_cancelled_jobs_are_dropped_unrun() -> None:
    """A job whose session left before a worker reached it is never given to the model."""
    backend = RecordingBackend()
    backend.gate.clear()
    engine = engine_with(backend, batch_wait_ms=0)
    try:
        blocker = engine.submit(request(session="running"))
        assert backend.entered.wait(10)  # the worker is now blocked inside the model with `running`
        gone = engine.submit(request(session="gone"))
        stays = engine.submit(request(session="stays"))
        assert gone.cancel()
        backend.gate.set()
        assert blocker.result(timeout=10).text == "running"
        assert stays.result(timeout=10).text == "stays"
    finally:
        engine.stop()
    assert "gone" not in functools.reduce(operator.iadd, backend.batches, [])


def test_awaiting_caller_cancellation_cancels_the_job() -> None:
    """Cancelling `await engine.transcribe(...)` cancels the queued job."""
    backend = RecordingBackend()
    backend.gate.clear()
    engine = engine_with(backend, batch_wait_ms=0)

    async def scenario() -> None:
        engine.submit(request(session="running"))
        assert await asyncio.to_thread(backend.entered.wait, 10)  # the worker holds `running`
        task = asyncio.create_task(engine.transcribe(request(session="abandoned")))
        await asyncio.sleep(0)  # the task runs up to its await: the job is queued
        assert len(engine.queue) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(scenario())
        backend.gate.set()
        engine.submit(request(session="after")).result(timeout=10)
    finally:
        engine.stop()
    assert "abandoned" not in functools.reduce(operator.iadd, backend.batches, [])
    assert engine.stats.jobs_dropped + len(engine.queue) <= 1


def test_failing_batch_errors_only_its_jobs() -> None:
    """A batch that raises fails its own futures; the engine keeps serving others."""
    backend = RecordingBackend(fail_session="bad")
    engine = engine_with(backend, batch_wait_ms=0)
    try:
        with pytest.raises(RuntimeError, match="bad batch"):
            engine.submit(request(session="bad")).result(timeout=10)
        assert engine.submit(request(session="good")).result(timeout=10).text == "good"
        assert engine.ready and engine.dead_reason is None
    finally:
        engine.stop()


def test_a_row_that_fails_a_batch_fails_only_itself() -> None:
    """When a batch raises, each of its jobs is retried alone: only the job that fails alone gets the error."""
    backend = RecordingBackend(fail_session="bad")
    backend.gate.clear()
    engine = engine_with(backend, batch_wait_ms=0, queue_max_size=8)
    try:
        blocker = engine.submit(request(session="blocker"))
        assert backend.entered.wait(10)  # the worker holds `blocker`; the next three queue up and form one batch
        futures = {name: engine.submit(request(session=name)) for name in ("a", "bad", "c")}
        backend.gate.set()
        assert blocker.result(timeout=10).text == "blocker"
        assert futures["a"].result(timeout=10).text == "a"
        assert futures["c"].result(timeout=10).text == "c"
        with pytest.raises(RuntimeError, match="bad batch"):
            futures["bad"].result(timeout=10)
        assert engine.ready and engine.dead_reason is None
    finally:
        engine.stop()
    assert backend.batches == [["blocker"], ["a", "bad", "c"], ["a"], ["bad"], ["c"]]
    assert (engine.stats.jobs_completed, engine.stats.jobs_failed) == (3, 1)


def test_device_failure_kills_the_engine() -> None:
    """A CUDA error marks the engine dead: not ready, new submissions refused, reason kept."""
    backend = RecordingBackend(fail_session="bad", fatal=True)
    engine = engine_with(backend, batch_wait_ms=0)
    try:
        with pytest.raises(RuntimeError):
            engine.submit(request(session="bad")).result(timeout=10)
        assert not engine.ready
        assert engine.dead_reason is not None and "CUDA error" in engine.dead_reason
        with pytest.raises(EngineUnavailableError):
            engine.submit(request(session="next"))
    finally:
        engine.stop()


class InterruptibleBackend(RecordingBackend):
    """Test double: every batch runs until `release` is set, or, when the engine passes
    `interrupt`, until that turns true (then it raises `Interrupted`, as the Whisper backend does)."""

    preempt_partials = True

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.stopped: list[list[str]] = []

    def transcribe_batch(  # type: ignore[override]
        self, requests: Sequence[TranscriptionRequest], interrupt: Callable[[], bool] | None = None
    ) -> list[TranscriptionResult]:
        sessions = [r.session_id for r in requests]
        self.entered.set()
        deadline = time.monotonic() + 10
        while not self.release.wait(0.005) and time.monotonic() < deadline:
            if interrupt is not None and interrupt():
                self.stopped.append(sessions)
                raise Interrupted
        self.batches.append(sessions)
        return [TranscriptionResult(text=s, language="en", tokens=1) for s in sessions]


def test_a_final_takes_the_worker_of_a_running_partial() -> None:
    """With every worker busy on partials, a final stops the one that started last and runs next;
    the stopped partial is refused as under load (PartialPreemptedError, a QueueFullError)."""
    backend = InterruptibleBackend()
    engine = engine_with(backend, workers=1, batch_wait_ms=0)
    try:
        assert engine.preempt
        partial = engine.submit(request(final=False, session="p1"))
        assert backend.entered.wait(5)
        final = engine.submit(request(final=True, session="f1"))
        with pytest.raises(PartialPreemptedError):
            partial.result(timeout=5)
        backend.release.set()
        assert final.result(timeout=5).text == "f1"
        assert backend.stopped == [["p1"]]
        assert backend.batches == [["f1"]]
        assert engine.stats.partials_preempted == 1
        assert engine.stats.jobs_completed == 1
        assert issubclass(PartialPreemptedError, QueueFullError)
    finally:
        backend.release.set()
        engine.stop()


def test_a_session_s_partials_are_never_stopped_twice_in_a_row() -> None:
    """Under overload every partial could be stopped: a session whose latest partial was stopped
    keeps its next one (the final waits); once that one has run, the session may be stopped again."""
    backend = InterruptibleBackend()
    engine = engine_with(backend, workers=1, batch_wait_ms=0)

    def stopped_by_a_final(session: str) -> bool:
        backend.entered.clear()
        partial = engine.submit(request(final=False, session=session))
        assert backend.entered.wait(5)
        final = engine.submit(request(final=True, session="f"))
        try:
            partial.result(timeout=1)
        except PartialPreemptedError:
            stopped = True
        except concurrent.futures.TimeoutError:
            stopped = False
        backend.release.set()
        assert final.result(timeout=5).text == "f"
        if not stopped:
            assert partial.result(timeout=5).text == session
        backend.release.clear()
        return stopped

    try:
        assert [stopped_by_a_final("a") for _ in range(3)] == [True, False, True]
        assert stopped_by_a_final("b")  # another session's partial
    finally:
        backend.release.set()
        engine.stop()


@pytest.mark.parametrize("case", ["free worker", "batch with a final", "preemption off"])
def test_a_final_waits_when_preempting_would_not_help_or_is_off(case: str) -> None:
    """No partial is stopped when a worker is free for the final, when the running batch holds a
    final itself, or when the backend does not allow it (PREEMPT_PARTIALS=false)."""
    backend = InterruptibleBackend()
    if case == "preemption off":
        backend.preempt_partials = False
    engine = engine_with(backend, workers=2 if case == "free worker" else 1, batch_wait_ms=0)
    try:
        first = engine.submit(request(final=case == "batch with a final", session="first"))
        assert backend.entered.wait(5)
        final = engine.submit(request(final=True, session="f1"))
        time.sleep(0.2)
        assert backend.stopped == [] and not first.done()
        backend.release.set()
        assert first.result(timeout=5).text == "first"
        assert final.result(timeout=5).text == "f1"
        assert engine.stats.partials_preempted == 0
    finally:
        backend.release.set()
        engine.stop()


@pytest.fixture(scope="module")
def backend(checkpoint_dir: Path) -> WhisperBackend:
    return WhisperBackend.load(Settings(transcription_model_id=str(checkpoint_dir), warmup=False))


def test_batched_results_equal_single_results(backend: WhisperBackend) -> None:
    """The real model gives each clip the same text alone as inside a batch, and clips differ."""
    clips = [speech_like(seed, 1.0 + seed * 0.7) for seed in range(6)]
    alone = [backend.transcribe_batch([TranscriptionRequest(audio=c)])[0].text for c in clips]
    together = [r.text for r in backend.transcribe_batch([TranscriptionRequest(audio=c) for c in clips])]
    assert together == alone
    assert len(set(alone)) == len(alone), alone


def test_the_whisper_backend_stops_between_model_calls_when_interrupted(backend: WhisperBackend) -> None:
    """`interrupt` is polled before each encoder layer and decoder step: true at once, or only
    after some calls, raises Interrupted; never true gives exactly the uninterrupted result."""
    clip = TranscriptionRequest(audio=speech_like(21, 3.0), is_final=False)
    plain = backend.transcribe_batch([clip])[0]
    polls: list[int] = []

    def after(calls: int) -> Callable[[], bool]:
        def interrupt() -> bool:
            polls.append(calls)
            return len([p for p in polls if p == calls]) > calls

        return interrupt

    with pytest.raises(Interrupted):
        backend.transcribe_batch([clip], interrupt=lambda: True)
    with pytest.raises(Interrupted):
        backend.transcribe_batch([clip], interrupt=after(6))  # in the decoder (tiny: 4 encoder layers)
    assert polls.count(6) == 7
    unasked = backend.transcribe_batch([clip], interrupt=after(10_000))[0]
    assert (unasked.text, unasked.tokens) == (plain.text, plain.tokens)
    assert 4 + 2 < polls.count(10_000) < 10_000  # every layer and step asked


def test_rows_with_different_prompts_and_languages_share_a_batch(backend: WhisperBackend) -> None:
    """Per-row prompts and languages are left-padded into one call; each row equals its single run."""
    requests = [
        TranscriptionRequest(audio=speech_like(11, 2.0)),
        TranscriptionRequest(audio=speech_like(12, 1.5), prompt="ba ke ti mo ra", language="de"),
        TranscriptionRequest(audio=speech_like(13, 2.5), prompt="su", language="en"),
    ]
    alone = [backend.transcribe_batch([r])[0] for r in requests]
    together = backend.transcribe_batch(requests)
    # Texts and words are exact. (Timings are not compared: a random-weight model's attention is
    # nearly flat, so its alignment path turns on rounding-level differences.)
    assert [(r.text, r.language) for r in together] == [(r.text, r.language) for r in alone]
    assert [[w.text for w in r.words] for r in together] == [[w.text for w in r.words] for r in alone]
    for a, b in zip(together, alone, strict=True):
        assert a.avg_logprob == pytest.approx(b.avg_logprob, abs=0.02)
        assert a.no_speech_prob == pytest.approx(b.no_speech_prob, abs=1e-4)
    assert len({r.text for r in together}) == 3


def test_results_carry_timed_words_and_scores(backend: WhisperBackend) -> None:
    """Words spell out the text, with times inside the clip that never go backwards."""
    clip = speech_like(4, 3.0)
    result = backend.transcribe_batch([TranscriptionRequest(audio=clip)])[0]
    assert result.words and " ".join(w.text for w in result.words) == result.text
    times = [t for w in result.words for t in (w.start, w.end)]
    assert times == sorted(times)
    assert times[0] >= 0.0 and times[-1] <= 30.0
    assert result.avg_logprob < 0.0
    assert result.no_speech_prob is not None and 0.0 <= result.no_speech_prob <= 1.0


def test_generation_is_capped_by_duration(backend: WhisperBackend) -> None:
    """Short audio cannot produce more tokens than its duration allows."""
    for seconds in (0.2, 1.0, 2.0):
        result = backend.transcribe_batch([TranscriptionRequest(audio=speech_like(3, seconds))])[0]
        assert 0 < result.tokens <= token_cap(seconds, backend.tokens_per_second)


def test_language_is_detected_or_forced(backend: WhisperBackend) -> None:
    """Without a language the detected one is reported; a forced one is reported as given."""
    clip = speech_like(1, 2.0)
    detected = backend.transcribe_batch([TranscriptionRequest(audio=clip)])[0].language
    assert detected in backend.languages  # type: ignore[operator]
    forced = backend.transcribe_batch([TranscriptionRequest(audio=clip, language="de")])[0]
    assert forced.language == "de"


def test_prompt_changes_the_decoding_context(backend: WhisperBackend) -> None:
    """A prompt is passed to the model (the text is conditioned on it) and is not echoed back."""
    clip = speech_like(2, 3.0)
    plain = backend.transcribe_batch([TranscriptionRequest(audio=clip)])[0].text
    prompted = backend.transcribe_batch([TranscriptionRequest(audio=clip, prompt="ba ke ti mo " * 3)])[0].text
    assert prompted != plain
    assert not prompted.startswith("ba ke ti mo")


def test_crashed_worker_kills_the_engine() -> None:
    """If a worker thread itself dies, the engine is marked dead and waiting jobs fail at once."""
    backend = RecordingBackend()
    backend.gate.clear()
    engine = engine_with(backend, batch_wait_ms=0, queue_max_size=8)
    try:
        running = engine.submit(request(session="running"))
        assert backend.entered.wait(10)
        waiting = engine.submit(request(session="waiting"))

        def broken(*_: object) -> None:
            raise RuntimeError("scheduler bug")

        engine.queue.take_batch = broken  # type: ignore[method-assign]
        backend.gate.set()
        assert running.result(timeout=10).text == "running"
        with pytest.raises(EngineUnavailableError, match="scheduler bug"):
            waiting.result(timeout=10)
        assert not engine.ready and "crashed" in (engine.dead_reason or "")
    finally:
        engine.stop()


def test_capacity_rule() -> None:
    """MAX_SESSIONS=auto: batch sizes double while throughput gains at least 10 %; sessions are 70 %
    of the best rate times the partial interval, within 1 and the limit."""
    calls: list[tuple[float, int, int]] = []

    def timed(cost: Callable[[int], float]) -> Callable[[float, int, int], float]:
        def measure(window_s: float, rows: int, tokens: int) -> float:
            calls.append((window_s, rows, tokens))
            return cost(rows)

        return measure

    # 1/0.3, 2/0.4, 4/0.6, 8/1.0 windows per second: every step gains, batch 8 is best (8 per second).
    capacity = measure_capacity(timed(lambda rows: 0.2 + 0.1 * rows), interval_s=1.0, max_batch=8, limit=64)
    assert calls == [(8.0, 1, 24), (8.0, 2, 24), (8.0, 4, 24), (8.0, 8, 24)]
    assert capacity == Capacity(sessions=5, batch=8, call_seconds=1.0, window_s=8.0, interval_s=1.0)
    calls.clear()
    # No gain past batch 2: the rate is 2/0.5 = 4 per second; a 2 s interval gives 5 sessions.
    flat = measure_capacity(timed(lambda rows: 0.5 if rows <= 2 else 0.25 * rows), 2.0, max_batch=16, limit=64)
    assert (flat.sessions, flat.batch, [rows for _, rows, _ in calls]) == (5, 2, [1, 2, 4])
    calls.clear()
    # A slow model: one call past CAPACITY_MAX_CALL_S ends the search; at least one session.
    slow = measure_capacity(timed(lambda rows: 6.0 * rows), 1.0, max_batch=8, limit=64)
    assert (slow.sessions, slow.batch, len(calls)) == (1, 1, 1)
    assert measure_capacity(timed(lambda rows: 0.01), 1.0, max_batch=1, limit=3).sessions == 3  # the limit


def test_max_sessions_auto_is_measured_shown_and_enforced(make_settings: Callable[..., Settings]) -> None:
    """With MAX_SESSIONS=auto the limit comes from timing the model at start-up; /ready and /metrics
    say it, and the session after it is refused with 1013."""
    from fastapi.testclient import TestClient

    from main import create_app

    settings = make_settings(max_sessions="auto", queue_max_size=2)
    with TestClient(create_app(settings)) as client:
        state = client.app.state.server  # type: ignore[attr-defined]
        capacity = state.engine.capacity
        assert capacity is not None and 1 <= capacity.sessions <= 2 and state.session_limit == capacity.sessions
        ready = client.get("/ready").json()
        assert ready["max_sessions"] == capacity.sessions
        assert ready["capacity"]["batch"] == capacity.batch and ready["capacity"]["window_s"] == 8.0
        assert f"rta_max_sessions {float(capacity.sessions)}" in client.get("/metrics").text
        opened = [client.websocket_connect("/ws/transcribe") for _ in range(capacity.sessions)]
        for ws in opened:
            assert ws.__enter__().receive_json()["status"] == "connected"
        with client.websocket_connect("/ws/transcribe") as refused:
            assert refused.receive_json()["code"] == "server_busy"
        for ws in opened:
            ws.__exit__(None, None, None)


@pytest.mark.parametrize(
    ("workers", "threads", "device", "expected"),
    [
        ("auto", "auto", "cpu", (2, 1)),
        ("auto", "auto", "cuda:0", (1, 0)),
        (1, "auto", "cpu", (1, 2)),
        (3, 4, "cpu", (3, 4)),
        (2, 4, "cuda:0", (2, 0)),
    ],
)
def test_inference_workers_and_threads_default_by_device(
    workers: int | str, threads: int | str, device: str, expected: tuple[int, int]
) -> None:
    """On two cores: two workers of one thread each on the CPU, one worker on a GPU (threads do not apply)."""
    settings = Settings(inference_workers=workers, inference_threads=threads)
    assert worker_threads(settings, device, cores=2) == expected


def test_the_engine_runs_as_many_workers_as_the_backend_asks_for() -> None:
    """INFERENCE_WORKERS=auto leaves the count to the loaded backend; each worker prepares its thread first."""
    backend = RecordingBackend()
    prepared: list[str] = []
    backend.workers = 3  # type: ignore[attr-defined]
    backend.prepare_worker = lambda: prepared.append(threading.current_thread().name)  # type: ignore[attr-defined]
    engine = engine_with(backend, workers=None)
    try:
        assert engine.workers == 3
        deadline = time.monotonic() + 10
        while len(prepared) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(prepared) == ["inference-0", "inference-1", "inference-2"]
    finally:
        engine.stop()
