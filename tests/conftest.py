"""Shared fixtures: a tiny real Whisper checkpoint, settings, in-process apps and live servers."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import soxr
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from real_time_audio.config import Settings, load_settings
from tests.whisper_checkpoint import build_checkpoint

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED = PROJECT_ROOT.parent / "shared"
# Every wait in the tests is multiplied by this (raise it on a slow machine).
TIME_SCALE = float(os.environ.get("TEST_TIME_SCALE", "1"))


def seconds(value: float) -> float:
    return value * TIME_SCALE


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Whisper folder, loaded by the app through `from_pretrained`."""
    return build_checkpoint(tmp_path_factory.mktemp("whisper-micro"))


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """Real Whisper tiny.en: the fallback model `make install-dev` brings, converted once and cached."""
    from real_time_audio.whisper.source import (
        FALLBACK_INSTALL,
        FALLBACK_MODEL_BIN_SHA256,
        default_cache_dir,
        fallback_folder,
        prepare_ct2_folder,
    )

    folder = fallback_folder()
    if folder is None:
        pytest.fail(f"the real test model is not installed: make install-dev does it ({FALLBACK_INSTALL})")
    return prepare_ct2_folder(folder, default_cache_dir(), expected_sha256=FALLBACK_MODEL_BIN_SHA256)


@pytest.fixture
def make_settings(checkpoint_dir: Path, tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "transcription_model_id": str(checkpoint_dir),
            "audio_storage_dir": tmp_path / "audio",
            "batch_wait_ms": 20,
            "partial_interval_ms": 200,
            "warmup": False,
            # Synthetic test signals are not speech to Silero; VAD tests turn it back on.
            "vad": "off",
        }
        values.update(overrides)
        if values["transcription_model_id"] == str(checkpoint_dir):
            # The random checkpoint babbles ("tovavavava to tova"); how well that compresses, and so
            # whether the loop guard drops it as degenerate, changes with the CPU's floating point
            # (2.5 on one machine, 2.2 on another). The guard has its own tests; real weights keep it.
            values.setdefault("compression_ratio_threshold", 1000.0)
        return load_settings(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    from main import create_app

    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def speech_like(seed: int, duration_s: float, rate: int = 16000) -> np.ndarray:
    """Deterministic noise with a syllable-like envelope; different seeds give different text."""
    rng = np.random.default_rng(seed)
    n = int(duration_s * rate)
    t = np.arange(n) / rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * (2 + seed % 5) * t + seed)
    tone = np.sin(2 * np.pi * (150 + 40 * (seed % 7)) * t)
    signal = (0.6 * rng.standard_normal(n) + tone) * envelope * 0.3
    return signal.astype(np.float32)


ESPEAK = shutil.which("espeak-ng")
needs_espeak = pytest.mark.skipif(ESPEAK is None, reason="espeak-ng is not installed (make test installs it as root)")


@pytest.fixture(scope="session")
def say(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., np.ndarray]:
    """Speech synthesized by espeak-ng, as 16 kHz mono float32 (cached per text and voice)."""
    folder = tmp_path_factory.mktemp("espeak")
    cache: dict[tuple[str, str], np.ndarray] = {}

    def synthesize(text: str, voice: str = "en-us") -> np.ndarray:
        if (text, voice) not in cache:
            assert ESPEAK is not None
            path = folder / f"{len(cache)}.wav"
            subprocess.run([ESPEAK, "-v", voice, "-s", "160", "-w", str(path), text], check=True)
            audio, rate = soundfile.read(path, dtype="float32")
            cache[text, voice] = soxr.resample(audio, rate, 16000).astype(np.float32)
        return cache[text, voice]

    return synthesize


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def frames(data: bytes, size: int = 8192) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def receive_until(ws: Any, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Collect TestClient messages up to and including the first that matches."""
    seen = []
    while True:
        message = ws.receive_json()
        seen.append(message)
        if predicate(message):
            return seen


def is_status(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("type") == "status" and m.get("status") == name


def finals(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m.get("type") == "transcription" and m["is_final"]]


def assert_finals_within(messages: list[dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    """The finals' word timings lie in [start, end], never go back, and give each final its span."""
    found = finals(messages)
    previous = start
    for final in found:
        words = final["words"]
        assert words and " ".join(w["word"] for w in words) == final["text"]
        assert (final["start"], final["end"]) == (words[0]["start"], words[-1]["end"])
        for word in words:
            assert previous <= word["start"] <= word["end"] <= end, (previous, word, end)
            previous = word["end"]
    return found


def record_decode_lengths(engine: Any) -> list[int]:
    """Make the engine's backend note the length (in samples) of every clip it decodes."""
    real = engine.backend.transcribe_batch
    lengths: list[int] = []

    def recording(requests: Any) -> Any:
        lengths.extend(len(r.audio) for r in requests)
        return real(requests)

    engine.backend.transcribe_batch = recording
    return lengths


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM a server process (a graceful shutdown), then SIGKILL it if it has not exited in 30 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(seconds(30))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """A real uvicorn server running `app` in a background thread on a free port."""

    def __init__(self, app: FastAPI, **config: Any) -> None:
        self.app = app
        self.port = free_port()
        options: dict[str, Any] = {"log_level": "warning", "lifespan": "on", "ws": "websockets-sansio", **config}
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, **options))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.server_loop: asyncio.AbstractEventLoop

    def _serve(self) -> None:
        self.server_loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.server_loop)
        try:
            self.server_loop.run_until_complete(self.server.serve())
        finally:
            self.server_loop.close()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/transcribe"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + seconds(60)
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(seconds(30))


@pytest.fixture
def live_server(app: FastAPI) -> Iterator[LiveServer]:
    with LiveServer(app) as server:
        yield server


async def stream_session(
    url: str,
    audio: bytes,
    *,
    frame_bytes: int = 8192,
    delay_s: float = 0.0,
    config: dict[str, Any] | None = None,
    flush_every: int = 0,
) -> dict[str, Any]:
    """Drive one session with the `websockets` client; returns every message and the close code."""
    import websockets

    messages: list[dict[str, Any]] = []
    async with websockets.connect(url, max_size=None) as ws:
        messages.append(json.loads(await asyncio.wait_for(ws.recv(), seconds(30))))

        async def reader() -> None:
            async for raw in ws:
                messages.append(json.loads(raw))

        task = asyncio.create_task(reader())
        if config:
            await ws.send(json.dumps({"type": "config", **config}))
        for index, chunk in enumerate(frames(audio, frame_bytes), start=1):
            await ws.send(chunk)
            if flush_every and index % flush_every == 0:
                await ws.send(json.dumps({"type": "flush"}))
            if delay_s:
                await asyncio.sleep(delay_s)
        await ws.send("END")
        await asyncio.wait_for(task, seconds(120))
        code = ws.close_code
    return {"messages": messages, "close_code": code}
