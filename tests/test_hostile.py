"""Attacks on a real server process, started the README's way (`python main.py`) and the
production way (`gunicorn -c gunicorn.conf.py`): decompression bombs, clients that vanish,
clients that never read, slow uploads and half-sent requests, tokens in logs, poisoned prompts,
other tokens' records. Every bound is asserted from the server's own counters (/metrics:
decoded seconds, open sessions, threads, resident memory), and a normal client connected at the
same time must get its `connected` and its text as usual.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import websockets

from tests import hostile_media
from tests.conftest import PROJECT_ROOT, finals, free_port, pcm16, seconds, speech_like, stop_process
from tests.test_server_process import wait_ready

pytestmark = pytest.mark.slow  # integration: real servers, sessions or models

BIN = Path(sys.executable).parent
TOKEN = "tok-alpha-5f1e"
OTHER_TOKEN = "tok-beta-77c2"
ADMIN_TOKEN = "tok-admin-0d93"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HEADER_TIMEOUT_S = 2
UPLOAD_TIMEOUT_S = 3
MAX_SESSIONS = 6


@dataclass
class Server:
    port: int
    storage: Path
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def counter(self, name: str) -> float:
        return self.metrics().get(name, 0.0)

    def logged(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module", params=["uvicorn", "gunicorn"])
def server(
    request: pytest.FixtureRequest, checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp(f"hostile-{request.param}")
    port = free_port()
    env = {
        **os.environ,
        "TRANSCRIPTION_MODEL_ID": str(checkpoint_dir),
        "AUDIO_STORAGE_DIR": str(folder / "audio"),
        "PYTHONPATH": str(PROJECT_ROOT),
        "HF_HUB_OFFLINE": "1",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "API_TOKENS": f"{TOKEN},{OTHER_TOKEN}",
        "ADMIN_TOKENS": ADMIN_TOKEN,
        "MAX_SESSIONS": str(MAX_SESSIONS),
        "QUEUE_MAX_SIZE": str(MAX_SESSIONS * 2),
        "HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "UPLOAD_TIMEOUT_S": str(UPLOAD_TIMEOUT_S),
        "IDLE_TIMEOUT_S": "8",
        "LOG_LEVEL": "INFO",
    }
    if request.param == "uvicorn":
        command = [str(BIN / "python"), "main.py"]  # what `make run` runs
    else:
        command = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "main:app"]
    log = folder / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    served = Server(port, folder / "audio", process, log)
    try:
        try:
            wait_ready(port, process, seconds(120))
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{served.logged()[-3000:]}") from None
        yield served
    finally:
        stop_process(process)


async def normal_session(server: Server, seed: int = 5) -> dict[str, Any]:
    """A well-behaved client: 3 s of speech-like PCM at real-time pace, END, everything back."""
    audio = pcm16(speech_like(seed, 3.0))
    messages: list[dict[str, Any]] = []
    started = time.monotonic()
    async with websockets.connect(f"{server.ws}/ws/transcribe", additional_headers=AUTH) as ws:
        messages.append(json.loads(await ws.recv()))
        connected_after = time.monotonic() - started
        for offset in range(0, len(audio), 3200):
            await ws.send(audio[offset : offset + 3200])
            await asyncio.sleep(0.1)
        await ws.send(json.dumps({"type": "end"}))
        messages += await read_all(ws)
        close_code = ws.close_code
    return {"messages": messages, "close_code": close_code, "connected_after": connected_after}


async def read_all(ws: Any) -> list[dict[str, Any]]:
    """Every message until the server closes (with any code)."""
    messages = []
    with contextlib.suppress(websockets.ConnectionClosed):
        async for raw in ws:
            messages.append(json.loads(raw))
    return messages


def assert_normal(result: dict[str, Any]) -> None:
    messages = result["messages"]
    assert messages[0]["status"] == "connected"
    assert result["close_code"] == 1000 and messages[-1]["status"] == "completed"
    assert messages[-1]["text"] == " ".join(m["text"] for m in finals(messages) if m["text"])
    assert not [m for m in messages if m["type"] == "error"]


async def bomb_session(server: Server, encoding: str, data: bytes) -> tuple[list[dict[str, Any]], int | None]:
    messages: list[dict[str, Any]] = []
    async with websockets.connect(
        f"{server.ws}/ws/transcribe?encoding={encoding}", additional_headers=AUTH, max_size=None
    ) as ws:
        messages.append(json.loads(await ws.recv()))
        try:
            for offset in range(0, len(data), 1024):
                await ws.send(data[offset : offset + 1024])
            await ws.send(json.dumps({"type": "end"}))
        except websockets.ConnectionClosed:
            pass
        with contextlib.suppress(websockets.ConnectionClosed):  # a close other than 1000 ends the iteration
            async for raw in ws:
                messages.append(json.loads(raw))
        return messages, ws.close_code


BOMBS = hostile_media.BOMBS


@pytest.mark.parametrize("encoding", sorted(BOMBS))
def test_a_decompression_bomb_ends_with_bad_audio_within_its_budget(server: Server, encoding: str) -> None:
    data = BOMBS[encoding]()
    before = server.metrics()

    async def attack() -> tuple[tuple[list[dict[str, Any]], int | None], dict[str, Any]]:
        return await asyncio.gather(bomb_session(server, encoding, data), normal_session(server))

    (messages, close_code), normal = asyncio.run(attack())
    after = server.metrics()
    errors = [m for m in messages if m["type"] == "error"]
    assert close_code == 1007
    assert [e["code"] for e in errors] == ["bad_audio"]
    assert "decodes to more audio than any real codec produces" in errors[0]["message"]
    decoded = after["rta_audio_received_seconds_total"] - before["rta_audio_received_seconds_total"]
    # The bomb's budget (10 s, plus 1000 bytes of audio per byte: at most len(data)/32 s), one frame
    # of 8.2 s, and the normal client's 3 s.
    assert decoded <= 10 + len(data) / 32 + 8.2 + 3.5
    assert after["process_resident_memory_bytes"] - before["process_resident_memory_bytes"] < 200e6
    assert_normal(normal)


def test_a_wav_declaring_1_hz_is_refused_before_any_audio(server: Server) -> None:
    before = server.counter("rta_audio_received_seconds_total")
    messages, close_code = asyncio.run(bomb_session(server, "wav", hostile_media.mulaw_wav(500)))
    assert close_code == 1007
    assert [m["message"] for m in messages if m["type"] == "error"] == [
        "the wav stream's audio is 1 Hz with 1 channel(s); accepted are 8000-48000 Hz and 1-2 channels; "
        "the session ends: the audio before this point is transcribed and kept"
    ]
    assert server.counter("rta_audio_received_seconds_total") == before


def test_an_uploaded_bomb_is_refused_and_the_whole_file_kept(server: Server) -> None:
    data = hostile_media.flac_bomb(400)
    before = server.counter("rta_audio_received_seconds_total")
    status, body, headers = upload(server, data, "bomb.flac")
    assert status == 400 and body["error"]["code"] == "bad_audio"
    assert "decodes to more audio than any real codec produces" in body["error"]["message"]
    assert server.counter("rta_audio_received_seconds_total") - before <= 10 + len(data) / 32 + 8.2
    record = json.loads((server.storage / headers["X-Session-Id"] / "session.json").read_text())
    assert (record["status"], record["bytes"]) == ("bad_audio", len(data))


def upload(server: Server, data: bytes, name: str, token: str = TOKEN, **fields: str) -> tuple[int, Any, Any]:
    boundary = "hostile0boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
        for key, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/v1/audio/transcriptions",
        data=b"".join(parts),
        headers={"Authorization": f"Bearer {token}", "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def wait_until(condition: Any, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def test_sessions_whose_clients_vanish_release_everything(server: Server) -> None:
    """Six clients stream a bomb-sized FLAC and drop their TCP connections mid-stream; a normal
    client meanwhile connects at once, and the slots, threads and memory come back."""
    baseline = server.metrics()
    data = hostile_media.flac_bomb(60)  # within budget per slice: decoding is busy when they vanish

    async def vanish() -> None:
        ws = await websockets.connect(
            f"{server.ws}/ws/transcribe?encoding=flac", additional_headers=AUTH, max_size=None
        )
        await ws.recv()
        for offset in range(0, len(data), 200):
            await ws.send(data[offset : offset + 200])
        ws.transport.abort()  # no close frame: the connection just disappears

    async def attack() -> dict[str, Any]:
        await asyncio.gather(*(vanish() for _ in range(MAX_SESSIONS - 1)))
        return await normal_session(server)

    normal = asyncio.run(attack())
    assert_normal(normal)
    assert normal["connected_after"] < 5  # not queued behind the vanished sessions' work
    assert wait_until(lambda: server.counter("rta_active_sessions") == 0, seconds(20))
    assert wait_until(lambda: server.counter("rta_threads") <= baseline["rta_threads"] + 2, seconds(20))


def test_echo_is_bounded_when_the_client_never_reads(server: Server) -> None:
    """A client floods /ws/echo and reads nothing: the server stops reading at its 8 MiB buffer
    (TCP holds the client back), and drops the client after IDLE_TIMEOUT_S."""
    before = server.metrics()
    sent = hostile_media.flood_without_reading(server.port, "/ws/echo?delay=0", AUTH, limit=400 << 20)
    assert sent < 64 << 20  # 8 MiB buffered plus what the sockets hold, not the 400 MiB offered
    grown = server.counter("process_resident_memory_bytes") - before["process_resident_memory_bytes"]
    assert grown < 100e6
    assert wait_until(lambda: server.counter("rta_active_echo_sessions") == 0, seconds(30))


def test_echo_counts_toward_max_sessions(server: Server) -> None:
    async def attack() -> list[dict[str, Any]]:
        echoes = [
            await websockets.connect(f"{server.ws}/ws/echo", additional_headers=AUTH) for _ in range(MAX_SESSIONS)
        ]
        try:
            for echo in echoes:
                await echo.recv()
            async with websockets.connect(f"{server.ws}/ws/transcribe", additional_headers=AUTH) as ws:
                return await read_all(ws)
        finally:
            for echo in echoes:
                await echo.close()

    refused = asyncio.run(attack())
    assert refused[0]["code"] == "server_busy"


def test_slow_uploads_hold_no_slot_and_are_cut_off(server: Server) -> None:
    """Uploads that stall after a few body bytes take no session slot (a WebSocket still gets in)
    and are answered 408 after UPLOAD_TIMEOUT_S."""
    sockets = []
    for _ in range(MAX_SESSIONS + 2):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n".encode()
            + b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r"
        )
        sockets.append(sock)
    try:
        assert_normal(asyncio.run(normal_session(server)))
        assert server.counter("rta_active_rest_requests") == 0
        for sock in sockets:
            sock.settimeout(UPLOAD_TIMEOUT_S + seconds(15))
            answer = sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"upload_timeout" in answer
    finally:
        for sock in sockets:
            sock.close()


def test_half_sent_requests_are_closed_after_the_header_timeout(server: Server) -> None:
    sockets = []
    for index in range(50):
        sock = socket.create_connection(("127.0.0.1", server.port))
        if index % 2:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # a head that never ends
        sockets.append(sock)
    started = time.monotonic()
    try:
        for sock in sockets:
            sock.settimeout(HEADER_TIMEOUT_S + seconds(15))
            assert sock.recv(4096) == b""  # closed by the server, no response
        assert time.monotonic() - started < HEADER_TIMEOUT_S + seconds(15)
    finally:
        for sock in sockets:
            sock.close()


def test_tokens_never_reach_the_log(server: Server) -> None:
    """A token in the URL, in a subprotocol and in a header: the server's whole output (access log
    included) never shows one."""
    subprotocol = "rta.token." + base64.urlsafe_b64encode(OTHER_TOKEN.encode()).decode().rstrip("=")

    async def sessions() -> None:
        for url, options in [
            (f"{server.ws}/ws/transcribe?token={TOKEN}", {}),
            (f"{server.ws}/ws/transcribe", {"subprotocols": ["rta.v1", subprotocol]}),
            (f"{server.ws}/ws/transcribe?token=wrong-{TOKEN}", {}),
        ]:
            async with websockets.connect(url, **options) as ws:  # type: ignore[arg-type]
                with contextlib.suppress(websockets.ConnectionClosed):  # the wrong token is refused (1008)
                    await ws.recv()
                    await ws.send(json.dumps({"type": "end"}))
                await read_all(ws)

    asyncio.run(sessions())
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/?token={TOKEN}", timeout=10):
        pass
    # The access lines are there (written once the response is sent), without the secret.
    assert wait_until(lambda: "token=[REDACTED]" in server.logged(), seconds(10))
    logged = server.logged()
    for secret in (TOKEN, OTHER_TOKEN, subprotocol.removeprefix("rta.token.")):
        assert secret not in logged


def test_a_prompt_of_special_tokens_is_plain_text(server: Server) -> None:
    """`<|endoftext|>` in a prompt is text, not a token: the session and an upload work as usual."""
    prompt = "<|endoftext|><|startoftranscript|><|en|> names: Zoë"

    async def session() -> dict[str, Any]:
        audio = pcm16(speech_like(3, 2.0))
        async with websockets.connect(f"{server.ws}/ws/transcribe", additional_headers=AUTH) as ws:
            messages = [json.loads(await ws.recv())]
            await ws.send(json.dumps({"type": "config", "prompt": prompt}))
            await ws.send(audio)
            await ws.send(json.dumps({"type": "end"}))
            messages += await read_all(ws)
            return {"messages": messages[:1] + messages[2:], "close_code": ws.close_code, "connected_after": 0}

    assert_normal(asyncio.run(session()))
    status, body, _ = upload(server, hostile_media_wav(), "speech.wav", prompt=prompt, response_format="json")
    assert status == 200 and isinstance(body["text"], str)


def hostile_media_wav() -> bytes:
    from real_time_audio.audio.files import encode

    return encode(speech_like(4, 2.0), 16000, "wav")


def test_a_record_is_readable_only_by_its_token(server: Server) -> None:
    session_id = asyncio.run(normal_session(server))["messages"][0]["session_id"]
    base = f"http://127.0.0.1:{server.port}/sessions/{session_id}"

    def get(url: str, token: str) -> int:
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}), timeout=10
            ) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            assert json.loads(exc.read())["detail"]["message"] == f"no session {session_id}"
            return exc.code

    assert [get(base, TOKEN), get(base + "/audio", TOKEN)] == [200, 200]
    assert [get(base, OTHER_TOKEN), get(base + "/audio", OTHER_TOKEN)] == [404, 404]
    assert [get(base, ADMIN_TOKEN), get(base + "/audio", ADMIN_TOKEN)] == [200, 200]


def test_small_ones(server: Server) -> None:
    """A forged log line, an oversized text frame (refused unparsed), END then an abrupt close, server
    paths, API docs."""

    async def attacks() -> tuple[list[dict[str, Any]], int | None, str]:
        async with websockets.connect(f"{server.ws}/ws/transcribe", additional_headers=AUTH) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "config", "x\nERROR forged line": 1}))
            await ws.recv()
            await ws.send("{" + " " * 200_000 + "}")  # under the binary limit of 1 MiB, far over any message
            oversized = [json.loads(await ws.recv())]
            await ws.send(json.dumps({"type": "end"}))
            oversized += await read_all(ws)
            oversized_end = (oversized, ws.close_code)
        ws = await websockets.connect(f"{server.ws}/ws/transcribe", additional_headers=AUTH)
        session_id = json.loads(await ws.recv())["session_id"]
        await ws.send(pcm16(speech_like(6, 2.0)))
        await ws.send(json.dumps({"type": "end"}))
        ws.transport.abort()
        return oversized_end[0], oversized_end[1], session_id

    messages, close_code, session_id = asyncio.run(attacks())
    assert messages[0] == {
        "type": "error",
        "code": "bad_message",
        "message": "text frame of 200002 characters exceeds the limit of 65536",
    }
    assert close_code == 1000 and messages[-1]["status"] == "completed"  # the session went on
    record = server.storage / session_id / "session.json"
    assert wait_until(lambda: json.loads(record.read_text()).get("status") == "completed", seconds(30))
    assert json.loads(record.read_text())["bytes"] == len(pcm16(speech_like(6, 2.0)))
    logged = server.logged()
    assert "\nERROR forged line" not in logged and "x\\nERROR forged line" in logged
    for path in ("/docs", "/redoc", "/openapi.json"):
        status = urllib_status(f"http://127.0.0.1:{server.port}{path}")
        assert status == (404 if "gunicorn" in server.process.args[0] else 200), path
    completed = asyncio.run(normal_session(server))["messages"][-1]
    assert completed["recording"]["audio"] == f"/sessions/{completed['session_id']}/audio"
    assert str(server.storage) not in json.dumps(completed)
    assert re.fullmatch(r"/sessions/[0-9a-f]{32}/audio", completed["recording"]["audio"])


def urllib_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
