"""Graceful drain: on shutdown every open session gets the finals for what it sent, then close 1001."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import websockets

from main import create_app
from real_time_audio.config import Settings
from real_time_audio.ops.drain import drain
from tests.conftest import (
    PROJECT_ROOT,
    LiveServer,
    finals,
    frames,
    free_port,
    pcm16,
    seconds,
    speech_like,
    stream_session,
)
from tests.test_server_process import BIN, server_env, wait_ready

pytestmark = pytest.mark.slow  # integration: real servers, sessions or models

# No partials: a session's finals then depend only on the audio, so they can be compared exactly.
QUERY = "?interim_results=false"


class OpenSession:
    """A client that streams audio without END and keeps every message until the server closes."""

    def __init__(self, url: str, audio: bytes) -> None:
        self.url = url
        self.audio = audio
        self.messages: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self.sent = asyncio.Event()

    async def run(self) -> None:
        async with websockets.connect(self.url, max_size=None) as ws:
            reader = asyncio.create_task(self._read(ws))
            for chunk in frames(self.audio, 4000):
                await ws.send(chunk)
                await asyncio.sleep(0.01)
            await ws.send(json.dumps({"type": "keepalive"}))
            self.sent.set()
            await asyncio.wait_for(reader, seconds(120))
            self.close_code, self.close_reason = ws.close_code, ws.close_reason or ""

    async def _read(self, ws: Any) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in ws:
                self.messages.append(json.loads(raw))


async def reference_text(url: str, audio: bytes) -> str:
    """What a session that sends the same audio and then END is told."""
    result = await stream_session(url, audio, frame_bytes=4000)
    return str(result["messages"][-1]["text"])


def assert_drained(client: OpenSession, reference: str, storage: Path) -> None:
    """The finals cover all audio sent, no `completed` was sent, the close is 1001, the record is closed."""
    assert client.close_code == 1001, client.messages[-3:]
    assert client.close_reason == "server shutting down"
    session_id = client.messages[0]["session_id"]
    texts = [m["text"] for m in finals(client.messages)]
    assert " ".join(t for t in texts if t) == reference != ""
    assert [m for m in client.messages if m.get("status") == "completed"] == []
    # The last message says what was received and where a client may resend from elsewhere.
    last = client.messages[-1]
    assert last["status"] == "shutting_down" and last["session_id"] == client.messages[0]["session_id"]
    assert (last["text"], last["segments"], last["duration"]) == (reference, len(texts), len(client.audio) / 32000)
    assert last["recording"] == {
        "audio": f"/sessions/{last['session_id']}/audio",
        "bytes": len(client.audio),
        "sha256": hashlib.sha256(client.audio).hexdigest(),
    }
    resume = last["resume"]
    assert 0 <= resume["bytes"] <= len(client.audio) and resume["bytes"] % 2 == 0
    assert resume["at"] == round(resume["bytes"] / 32000, 3)
    assert 0 <= resume["segment_id"] <= len(texts)
    folder = storage / session_id
    meta = json.loads((folder / "session.json").read_text())
    assert (meta["status"], meta["bytes"]) == ("server_shutdown", len(client.audio))
    assert meta["sha256"] == hashlib.sha256(client.audio).hexdigest()
    assert (folder / "audio.wav").read_bytes()[44:] == client.audio
    stored = [json.loads(line)["text"] for line in (folder / "transcript.jsonl").read_text().splitlines()]
    assert stored == texts


def test_drain_sends_finals_then_1001(make_settings: Callable[..., Settings]) -> None:
    """drain() finalizes every open session; meanwhile new sessions get server_busy/1013 and /ready is 503."""
    settings = make_settings()
    app = create_app(settings)
    clips = [pcm16(speech_like(seed, 2.0)) for seed in (61, 62)]
    with LiveServer(app) as server:
        url = server.url + QUERY
        references = [asyncio.run(reference_text(url, clip)) for clip in clips]

        async def scenario() -> tuple[list[OpenSession], dict[str, Any], int | None, int]:
            clients = [OpenSession(url, clip) for clip in clips]
            tasks = [asyncio.create_task(c.run()) for c in clients]
            await asyncio.gather(*(c.sent.wait() for c in clients))
            draining = asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(drain(app.state.server, 30), server.server_loop)
            )
            await asyncio.sleep(0.05)
            async with websockets.connect(url) as late:
                refusal = json.loads(await late.recv())
                with contextlib.suppress(websockets.ConnectionClosed):
                    await late.recv()
            ready = await asyncio.to_thread(status_of, f"http://127.0.0.1:{server.port}/ready")
            forced = await draining
            await asyncio.gather(*tasks)
            return clients, refusal, late.close_code, ready if forced == 0 else -forced

        clients, refusal, late_code, ready = asyncio.run(scenario())
    assert refusal == {
        "type": "error",
        "code": "server_busy",
        "message": "the server is shutting down; try again shortly",
    }
    assert (late_code, ready) == (1013, 503)
    for client, reference in zip(clients, references, strict=True):
        assert_drained(client, reference, settings.audio_storage_dir)


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
def test_sigterm_drains_a_real_server(server: str, checkpoint_dir: Path, tmp_path: Path) -> None:
    """SIGTERM to a real gunicorn (master) or uvicorn process: live sessions get their finals and 1001,
    their files are complete on disk, and the process exits cleanly."""
    port = free_port()
    storage = tmp_path / "audio"
    if server == "gunicorn":
        command = [str(BIN / "gunicorn"), "main:app", "-k", "uvicorn.workers.UvicornWorker"]
        command += ["-b", f"127.0.0.1:{port}", "--timeout", "120", "--graceful-timeout", "60"]
    else:
        command = [str(BIN / "uvicorn"), "main:app", "--host", "127.0.0.1", "--port", str(port)]
    env = server_env(checkpoint_dir, storage, DRAIN_TIMEOUT_S="40", LOG_FORMAT="json", VAD="off")
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, process, seconds(120))
        url = f"ws://127.0.0.1:{port}/ws/transcribe{QUERY}"
        clips = [pcm16(speech_like(seed, 2.0)) for seed in (71, 72, 73)]

        async def scenario() -> list[OpenSession]:
            clients = [OpenSession(url, clip) for clip in clips]
            tasks = [asyncio.create_task(c.run()) for c in clients]
            await asyncio.gather(*(c.sent.wait() for c in clients))
            process.send_signal(signal.SIGTERM)
            await asyncio.gather(*tasks)
            return clients

        clients = asyncio.run(scenario())
        assert process.wait(seconds(60)) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.stdout is not None
    log = process.stdout.read().decode()
    process.stdout.close()
    # References from a fresh in-process server on the same checkpoint and settings.
    references = reference_texts(checkpoint_dir, tmp_path / "reference", clips)
    for client, reference in zip(clients, references, strict=True):
        assert_drained(client, reference, storage)
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]  # LOG_FORMAT=json: every line
    ours = [entry for entry in entries if entry["logger"].startswith("real_time_audio")]
    drained = [entry for entry in ours if entry["message"].startswith("drained:")]
    assert [entry["message"] for entry in drained] == ["drained: 3 session(s) finished, 0 closed early"]
    session_lines = [entry for entry in ours if "session_id" in entry]
    assert {entry["session_id"] for entry in session_lines} == {c.messages[0]["session_id"] for c in clients}


def reference_texts(checkpoint_dir: Path, storage: Path, clips: list[bytes]) -> list[str]:
    from real_time_audio.config import load_settings

    settings = load_settings(
        transcription_model_id=str(checkpoint_dir), audio_storage_dir=storage, vad="off", warmup=False
    )
    with LiveServer(create_app(settings)) as server:
        return [asyncio.run(reference_text(server.url + QUERY, clip)) for clip in clips]
