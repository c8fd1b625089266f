"""Sessions under concurrency, over a real uvicorn server driven by the `websockets` client:
isolation, cross-session batching, coalescing, and clients that vanish at any moment."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets
from fastapi.testclient import TestClient

from main import create_app
from real_time_audio.config import Settings
from real_time_audio.service import Interrupted, TranscriptionEngine, TranscriptionRequest, TranscriptionResult
from tests.burst_speech import RATE, VOCABULARY, BurstTranscriber, EnergyScorer, burst, speech_block
from tests.conftest import (
    LiveServer,
    assert_finals_within,
    finals,
    frames,
    is_status,
    needs_espeak,
    pcm16,
    receive_until,
    record_decode_lengths,
    seconds,
    speech_like,
    stream_session,
)

pytestmark = pytest.mark.slow  # integration: real servers, sessions or models

N_SESSIONS = 6


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def final_texts(result: dict[str, Any]) -> list[str]:
    return [m["text"] for m in finals(result["messages"])]


def test_sessions_are_isolated_and_batched(make_settings: Callable[..., Settings]) -> None:
    """N concurrent sessions with different audio each get exactly the text they get alone,
    and the engine ran batches larger than one to serve them."""
    # No partial decodes (`interim_results` off; a long interval alone still lets the first one run,
    # and whether its draft reaches a final decode depends on timing): finals then depend only on
    # the flush points.
    settings = make_settings(batch_wait_ms=100, batch_max_size=8, partial_interval_ms=3_600_000)
    clips = [pcm16(speech_like(100 + i, 2.0 + 0.25 * i)) for i in range(N_SESSIONS)]
    options: dict[str, Any] = {"frame_bytes": 8000, "flush_every": 4, "config": {"interim_results": False}}
    with LiveServer(create_app(settings)) as server:
        alone = [run(stream_session(server.url, clip, **options)) for clip in clips]
        engine = server.app.state.server.engine
        before = sum(n for size, n in engine.stats.batch_sizes.items() if size > 1)

        async def together() -> list[dict[str, Any]]:
            return await asyncio.gather(*(stream_session(server.url, clip, delay_s=0.02, **options) for clip in clips))

        concurrent = run(together())
        batched = sum(n for size, n in engine.stats.batch_sizes.items() if size > 1) - before
    alone_texts = [final_texts(r) for r in alone]
    assert len({" ".join(t) for t in alone_texts}) == N_SESSIONS, "clips must differ for the test to prove anything"
    assert [final_texts(r) for r in concurrent] == alone_texts
    for clip, result in zip(clips, concurrent, strict=True):
        done = result["messages"][-1]
        assert done["status"] == "completed" and result["close_code"] == 1000
        assert done["recording"]["sha256"] == hashlib.sha256(clip).hexdigest()
    assert batched >= 1, f"no batch larger than 1: {engine.stats.batch_sizes}"


class SlowRecordingBackend:
    """Wraps the real backend: records which sessions share each batch, and slows each call down."""

    def __init__(self, real: Any, delay_s: float) -> None:
        self.real = real
        self.delay_s = delay_s
        self.batches: list[list[tuple[str, bool, int]]] = []
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def transcribe_batch(self, requests: Sequence[TranscriptionRequest]) -> list[TranscriptionResult]:
        with self.lock:
            self.batches.append([(r.session_id, r.is_final, len(r.audio)) for r in requests])
        threading.Event().wait(self.delay_s)
        return list(self.real.transcribe_batch(requests))


def test_audio_arriving_during_a_job_is_coalesced(make_settings: Callable[..., Settings]) -> None:
    """While a session's job runs, new frames accumulate into its next job: one job at a time per
    session, far fewer jobs than frames, and every sample still ends up in the finals."""
    settings = make_settings(partial_interval_ms=50, batch_wait_ms=0)
    app = create_app(settings)
    clip = pcm16(speech_like(5, 3.0))
    with LiveServer(app) as server:
        engine = server.app.state.server.engine
        spy = SlowRecordingBackend(engine.backend, delay_s=0.3)
        engine.backend = spy
        result = run(stream_session(server.url, clip, frame_bytes=1600, delay_s=0.01))  # 60 frames of 50 ms
    jobs = [job for batch in spy.batches for job in batch]
    assert all(len({sid for sid, _, _ in batch}) == len(batch) for batch in spy.batches)
    assert len(jobs) < 60 / 3
    assert len(engine.queue) == 0
    assert assert_finals_within(result["messages"], 0.0, 3.0)


def test_disconnects_at_random_moments_leave_nothing_behind(make_settings: Callable[..., Settings]) -> None:
    """Clients that vanish mid-stream, mid-inference or mid-flush leave no session, job, task or open
    file; each record says `disconnected`; a well-behaved session alongside completes normally."""
    settings = make_settings(partial_interval_ms=50, batch_wait_ms=5)
    app = create_app(settings)
    rng = random.Random(1234)
    good_clip = pcm16(speech_like(77, 2.0))

    async def vanishing(url: str, seed: int) -> str:
        ws = await websockets.connect(url)
        session_id = json.loads(await ws.recv())["session_id"]
        clip = pcm16(speech_like(seed, 2.0))
        for chunk in frames(clip, 4000)[: rng.randint(0, 8)]:
            await ws.send(chunk)
            await asyncio.sleep(rng.random() * 0.05)
        if rng.random() < 0.5:
            await ws.send(json.dumps({"type": "flush"}))
        if rng.random() < 0.3:
            await ws.send("END")
            await asyncio.sleep(0.01)
        await asyncio.sleep(rng.random() * 0.2)
        ws.transport.abort() if rng.random() < 0.5 else await ws.close()  # abrupt or polite
        return session_id

    with LiveServer(app) as server:
        engine = server.app.state.server.engine
        fd_before = len(os.listdir("/proc/self/fd"))
        threads_before = _non_pool_threads()

        async def scenario() -> tuple[list[str], dict[str, Any]]:
            good = asyncio.create_task(stream_session(server.url, good_clip, delay_s=0.05, frame_bytes=3200))
            gone = await asyncio.gather(*(vanishing(server.url, seed) for seed in range(16)))
            return gone, await good

        gone, good = run(scenario())
        state = server.app.state.server
        # A session leaves the registry before its close frame; its release (record closed, decoder
        # stopped) and then its own threads finish just after.
        deadline = asyncio.run(_wait_until(lambda: not state.sessions and not state.releasing, seconds(15)))
        assert deadline, f"sessions left: {list(state.sessions)}, releases running: {len(state.releasing)}"
        assert len(engine.queue) == 0
        assert len(os.listdir("/proc/self/fd")) <= fd_before
        assert asyncio.run(_wait_until(lambda: _non_pool_threads() == threads_before, seconds(10))), _non_pool_threads()
        loop_tasks = asyncio.run(_server_tasks(server))
    assert good["messages"][-1]["status"] == "completed" and good["close_code"] == 1000
    assert good["messages"][-1]["recording"]["sha256"] == hashlib.sha256(good_clip).hexdigest()
    for session_id in gone:
        meta = json.loads((Path(settings.audio_storage_dir) / session_id / "session.json").read_text())
        assert meta["status"] in ("disconnected", "completed"), meta["status"]
        assert meta["ended_at"] is not None
    assert loop_tasks == [], loop_tasks


def _non_pool_threads() -> list[str]:
    """Threads other than the event loop's bounded `to_thread` pool (which keeps idle workers)."""
    return sorted(t.name for t in threading.enumerate() if not t.name.startswith("asyncio_"))


async def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def _server_tasks(server: LiveServer) -> list[str]:
    """Names of the session tasks still alive on the server's event loop."""
    loop = server.server_loop
    future = asyncio.run_coroutine_threadsafe(_task_names(), loop)
    return await asyncio.wrap_future(future)


async def _task_names() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(("receive-", "transcribe-")))


# -- voice activity, through the real Whisper code path and through the burst-speech double ----


def send_paced(ws: Any, audio: bytes, frame_bytes: int, pause_s: float = 0.0) -> None:
    for chunk in frames(audio, frame_bytes):
        ws.send_bytes(chunk)
        if pause_s:
            time.sleep(pause_s)


def test_ten_minutes_of_silence_or_low_noise_cost_no_inference(make_settings: Callable[..., Settings]) -> None:
    """With Silero VAD, ten minutes of silence and ten of low noise: no text, no event, no model call."""
    settings = make_settings(vad="silero")
    noise = np.random.default_rng(3).standard_normal(600 * 16000) * 0.005
    streams = [np.zeros(600 * 16000, dtype=np.float32), noise.astype(np.float32)]
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.server.engine  # type: ignore[attr-defined]
        for audio in streams:
            data = pcm16(audio)
            with client.websocket_connect("/ws/transcribe") as ws:
                ws.receive_json()
                send_paced(ws, data, 64000)
                ws.send_text("END")
                messages = receive_until(ws, is_status("completed"))
            assert [m["type"] for m in messages] == ["status"]
            assert (messages[-1]["text"], messages[-1]["segments"]) == ("", 0)
            assert messages[-1]["recording"]["sha256"] == hashlib.sha256(data).hexdigest()
        assert (engine.stats.batches, engine.stats.jobs_completed, engine.stats.jobs_failed) == (0, 0, 0)


@needs_espeak
def test_speech_gives_events_and_finals_inside_each_utterance(
    make_settings: Callable[..., Settings], say: Callable[[str], np.ndarray]
) -> None:
    """Three spoken sentences with pauses: three start/end pairs near the truth, finals inside each
    utterance, and the model only ever sees speech (plus padding)."""
    # Each utterance on its own (no audio kept across the pauses), as the random model cannot
    # continue a sentence; test_real_model.py covers that on real weights.
    settings = make_settings(vad="silero", partial_interval_ms=300, context_audio_s=0)
    sentences = [
        say("the quick brown fox jumps over the lazy dog"),
        say("she had your dark suit in greasy wash water all year"),
        say("please call stella and ask her to bring these things"),
    ]
    silence = np.zeros(int(1.5 * 16000), dtype=np.float32)
    pieces, truth, position = [silence], [], len(silence)
    for sentence in sentences:
        truth.append((position / 16000, (position + len(sentence)) / 16000))
        pieces += [sentence, silence]
        position += len(sentence) + len(silence)
    audio = np.concatenate(pieces)
    with TestClient(create_app(settings)) as client:
        decoded = record_decode_lengths(client.app.state.server.engine)  # type: ignore[attr-defined]
        with client.websocket_connect("/ws/transcribe") as ws:
            ws.receive_json()
            send_paced(ws, pcm16(audio), 8192, pause_s=0.02)
            ws.send_text("END")
            messages = receive_until(ws, is_status("completed"))
    events = [m for m in messages if m["type"] in ("speech_started", "speech_ended")]
    assert [m["type"] for m in events] == ["speech_started", "speech_ended"] * 3
    for (start, end), began, ended in zip(truth, events[::2], events[1::2], strict=True):
        assert start - 0.1 <= began["at"] <= start + 0.3
        assert end - 0.6 <= ended["at"] <= end + 0.1
    pad, tail = settings.vad_pad_ms / 1000, settings.vad_tail_ms / 1000  # the audio decoded around each utterance
    for (start, end), ended in zip(truth, events[1::2], strict=True):
        inside = [
            m for m in finals(messages) if start - pad - 0.1 <= m["start"] and m["end"] <= ended["at"] + tail + 0.05
        ]
        assert inside, f"no final for the utterance at {start:.2f}-{end:.2f} s"
    assert_finals_within(messages, 0.0, len(audio) / 16000)
    speech_and_padding = sum(end - start + pad + tail for start, end in truth)
    assert max(decoded) / 16000 <= max(end - start for start, end in truth) + pad + tail + 0.1
    assert sum(n for n in decoded) / 16000 < 10 * speech_and_padding  # never the silences


def test_a_client_that_goes_quiet_inside_the_tail_still_gets_its_final(make_settings: Callable[..., Settings]) -> None:
    """An utterance and 0.6 s of silence (the detector ends the utterance after 0.5 s; the 1 s tail
    is not complete), then nothing, not even END: the final comes once the rest of the tail would
    have arrived, decoded from the audio there is; the session stays open."""
    settings = make_settings(
        vad="silero", final_hold_ms=0, vad_tail_ms=1000, vad_quiet_tail_ms=1000, partial_interval_ms=60000
    )
    model = BurstTranscriber()

    def engine_factory(_: Settings) -> TranscriptionEngine:
        return TranscriptionEngine(lambda: model, warmup=False, batch_wait_ms=0)

    quiet = np.zeros(int(0.5 * RATE), dtype=np.float32)
    audio = np.concatenate([quiet, burst(1, 0.3), quiet[: RATE // 10], burst(2, 0.3), quiet, quiet[: RATE // 10]])
    app = create_app(settings, engine_factory=engine_factory, vad_factory=EnergyScorer)
    with TestClient(app) as client, client.websocket_connect("/ws/transcribe") as ws:
        ws.receive_json()
        ws.send_bytes(pcm16(audio))
        started = time.monotonic()
        messages = receive_until(ws, lambda m: m.get("type") == "transcription" and m["is_final"])
        waited = time.monotonic() - started
        assert [w["word"] for w in finals(messages)[0]["words"]] == [VOCABULARY[1], VOCABULARY[2]]
        assert waited >= 0.4  # it did wait for the tail (0.4 s of it were missing, plus 0.25 s of slack)
        # One decode, from the pre-roll (at 0.1 s) past where the old padding ended (1.6 s) up to what had
        # arrived (1.8 s; on a loaded machine the wait may run out before the last piece is fed).
        (window,) = model.window_seconds
        assert 1.5 + 0.05 < window <= len(audio) / RATE - 0.1 + 0.05
        ws.send_text("END")
        assert receive_until(ws, is_status("completed"))[-1]["text"] == f"{VOCABULARY[1]} {VOCABULARY[2]}"


def test_burst_speech_through_the_server_is_transcribed_exactly(make_settings: Callable[..., Settings]) -> None:
    """Two minutes of burst speech through a real session and engine (test-double model and VAD
    scorer): the finals are exactly the spoken words, and `completed` carries the same text."""
    settings = make_settings(vad="silero", partial_interval_ms=100)
    audio, spoken = speech_block(seed=11, seconds=120.0, long_utterance_s=35.0)
    model = BurstTranscriber()

    def engine_factory(_: Settings) -> TranscriptionEngine:
        return TranscriptionEngine(lambda: model, warmup=False, batch_wait_ms=0)

    app = create_app(settings, engine_factory=engine_factory, vad_factory=EnergyScorer)
    with TestClient(app) as client, client.websocket_connect("/ws/transcribe") as ws:
        ws.receive_json()
        send_paced(ws, pcm16(audio), 16000, pause_s=0.05)  # 0.5 s frames at 10x real time
        ws.send_text("END")
        messages = receive_until(ws, is_status("completed"))
    words = [w["word"] for m in finals(messages) for w in m["words"]]
    assert words == [w.text for w in spoken]
    assert messages[-1]["text"] == " ".join(w.text for w in spoken)
    assert any(not m["is_final"] for m in messages if m["type"] == "transcription")
    assert max(model.window_seconds) <= 30.0


class PreemptedEveryOtherPartial(BurstTranscriber):
    """The burst model, with every other batch of partials stopped part-way (as a final would stop it)."""

    preempt_partials = True

    def __init__(self) -> None:
        super().__init__()
        self.partial_batches = 0

    def transcribe_batch(  # type: ignore[override]
        self, requests: Sequence[TranscriptionRequest], interrupt: Callable[[], bool] | None = None
    ) -> list[TranscriptionResult]:
        if not any(r.is_final for r in requests):
            self.partial_batches += 1
            if self.partial_batches % 2:
                raise Interrupted
        return super().transcribe_batch(requests)


def test_preempted_partials_are_skipped_without_a_word_lost(make_settings: Callable[..., Settings]) -> None:
    """A partial stopped for a final is skipped like one refused for load: the client gets no error,
    partials still come, and the finals are exactly the spoken words."""
    settings = make_settings(vad="silero", partial_interval_ms=100)
    audio, spoken = speech_block(seed=12, seconds=40.0)
    model = PreemptedEveryOtherPartial()
    engines: list[TranscriptionEngine] = []

    def engine_factory(_: Settings) -> TranscriptionEngine:
        engines.append(TranscriptionEngine(lambda: model, warmup=False, batch_wait_ms=0))
        return engines[-1]

    app = create_app(settings, engine_factory=engine_factory, vad_factory=EnergyScorer)
    with TestClient(app) as client, client.websocket_connect("/ws/transcribe") as ws:
        ws.receive_json()
        send_paced(ws, pcm16(audio), 16000, pause_s=0.05)
        ws.send_text("END")
        messages = receive_until(ws, is_status("completed"))
    assert [m for m in messages if m["type"] == "error"] == []
    assert [w["word"] for m in finals(messages) for w in m["words"]] == [w.text for w in spoken]
    assert any(not m["is_final"] for m in messages if m["type"] == "transcription")
    assert engines[0].preempt
    assert engines[0].stats.partials_preempted == (model.partial_batches + 1) // 2 >= 3
