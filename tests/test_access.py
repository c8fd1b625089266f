"""Who may connect and for how long: tokens, origins, per-address limits, pings, session duration."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
import websockets
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from main import create_app
from real_time_audio.config import Settings
from tests.conftest import LiveServer, finals, pcm16, receive_until, seconds, speech_like
from tests.test_routes import end_session, expect_close

pytestmark = pytest.mark.slow  # integration: real servers, sessions or models

TOKENS = "alpha-token-1,beta-token-2"


@pytest.fixture
def guarded(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(api_tokens=TOKENS, allowed_origins="https://app.example.com,http://localhost:3000")


def refused(client: TestClient, path: str, headers: dict[str, str] | None = None) -> tuple[dict[str, Any], int]:
    """Connect, read the single error, and return it with the close code."""
    with client.websocket_connect(path, headers=headers or {}) as ws:
        error = ws.receive_json()
        with pytest.raises(Exception) as info:
            ws.receive_json()
    return error, int(getattr(info.value, "code", 0))


def refused_with(client: TestClient, subprotocols: list[str]) -> tuple[str, str | None]:
    with client.websocket_connect("/ws/transcribe", subprotocols=subprotocols) as ws:
        message = ws.receive_json()
        with pytest.raises(WebSocketDisconnect):
            ws.receive_json()
        return message["message"], ws.accepted_subprotocol


def test_tokens_are_required_and_checked(guarded: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """No token or a wrong one: `unauthorized` and 1008. A configured token by header or query: connected."""
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(guarded)) as client:
        assert refused(client, "/ws/transcribe") == (
            {
                "type": "error",
                "code": "unauthorized",
                "message": "a token is required: send 'Authorization: Bearer <token>', offer the WebSocket "
                "subprotocol 'rta.token.<base64url of the token>' (with 'rta.v1'), or add ?token=<token>",
            },
            1008,
        )
        assert refused(client, "/ws/transcribe?token=alpha-token-") == (
            {"type": "error", "code": "unauthorized", "message": "the token is not valid"},
            1008,
        )
        assert refused(client, "/ws/echo", {"Authorization": "Bearer nope"})[1] == 1008
        for path, headers in [
            ("/ws/transcribe?token=beta-token-2", {}),
            ("/ws/transcribe", {"Authorization": "Bearer alpha-token-1"}),
        ]:
            with client.websocket_connect(path, headers=headers) as ws:
                assert ws.receive_json()["status"] == "connected"
                end_session(ws)
        # A browser's way: the token as a subprotocol; the server selects the plain one, never the token.
        offered = ["rta.v1", "rta.token." + base64.urlsafe_b64encode(b"beta-token-2").decode().rstrip("=")]
        with client.websocket_connect("/ws/transcribe", subprotocols=offered) as ws:
            assert ws.accepted_subprotocol == "rta.v1"
            assert ws.receive_json()["status"] == "connected"
            end_session(ws)
        assert refused_with(client, ["rta.v1", "rta.token.YWxwaGE"]) == ("the token is not valid", "rta.v1")
        assert refused_with(client, ["rta.v1", "rta.token.***"]) == ("the token is not valid", "rta.v1")
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "refused connection" in logged
    for secret in ("alpha-token", "beta-token", "nope"):
        assert secret not in logged  # neither the configured tokens nor the one sent are ever logged


def test_origin_allow_list(guarded: Settings) -> None:
    """A browser Origin outside ALLOWED_ORIGINS gets `forbidden_origin` and 1008, even with a good token."""
    with TestClient(create_app(guarded)) as client:
        error, code = refused(client, "/ws/transcribe?token=alpha-token-1", {"Origin": "https://evil.example.com"})
        assert (error, code) == (
            {
                "type": "error",
                "code": "forbidden_origin",
                "message": "origin 'https://evil.example.com' is not allowed to use this server",
            },
            1008,
        )
        for origin in ("https://app.example.com", "http://localhost:3000", None):
            headers = {"Origin": origin} if origin else {}  # no Origin: not a browser, allowed
            with client.websocket_connect("/ws/transcribe?token=alpha-token-1", headers=headers) as ws:
                assert ws.receive_json()["status"] == "connected"
                end_session(ws)


def test_cors_for_the_http_api(guarded: Settings) -> None:
    """Preflights from an allowed origin are answered for the HTTP API; other origins get no CORS grant."""
    with TestClient(create_app(guarded)) as client:
        preflight = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
        allowed = client.options("/ready", headers={"Origin": "https://app.example.com", **preflight})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        denied = client.options("/ready", headers={"Origin": "https://evil.example.com", **preflight})
        assert denied.status_code == 400
        assert "access-control-allow-origin" not in denied.headers
        simple = client.get("/health", headers={"Origin": "https://app.example.com"})
        assert simple.headers["access-control-allow-origin"] == "https://app.example.com"


def test_connections_per_client_address(make_settings: Callable[..., Settings]) -> None:
    """Past MAX_CONNECTIONS_PER_CLIENT from one address: `server_busy` and 1013; a slot frees on close."""
    settings = make_settings(max_connections_per_client=2)
    with (
        TestClient(create_app(settings)) as client,
        client.websocket_connect("/ws/transcribe") as a,
        client.websocket_connect("/ws/echo") as b,
    ):
        a.receive_json()
        b.receive_json()
        assert refused(client, "/ws/transcribe") == (
            {
                "type": "error",
                "code": "server_busy",
                "message": "too many connections from testclient: the limit is 2 at a time",
            },
            1013,
        )
        end_session(a)
        with client.websocket_connect("/ws/transcribe") as c:
            assert c.receive_json()["status"] == "connected"
            end_session(c)
        b.send_text("END")
        expect_close(b, 1000)


def test_max_session_duration_finishes_like_end(make_settings: Callable[..., Settings]) -> None:
    """At MAX_SESSION_S the session says so, transcribes all audio it received, completes and closes 1000."""
    settings = make_settings(max_session_s=1.5)
    clip = pcm16(speech_like(5, 2.0))
    with TestClient(create_app(settings)) as client, client.websocket_connect("/ws/transcribe") as ws:
        ws.receive_json()
        ws.send_bytes(clip)
        messages = receive_until(ws, lambda m: m.get("status") == "completed")
        errors = [m for m in messages if m["type"] == "error"]
        assert errors == [
            {
                "type": "error",
                "code": "max_duration",
                "message": "the session reached the limit of 1.5 s; the audio received so far is being finalized",
            }
        ]
        done = messages[-1]
        assert done["recording"]["bytes"] == len(clip)
        assert done["recording"]["sha256"] == hashlib.sha256(clip).hexdigest()
        assert done["text"] == " ".join(m["text"] for m in finals(messages)) != ""
        assert done["duration"] == 2.0
        expect_close(ws, 1000)
    meta = json.loads((settings.audio_storage_dir / done["session_id"] / "session.json").read_text())
    assert meta["status"] == "completed"


async def hold_with(url: str, pings: bool, hold_s: float) -> tuple[list[dict[str, Any]], int | None]:
    """Stay connected for `hold_s` sending nothing but (optionally) WebSocket pings, then END."""
    async with websockets.connect(url, ping_interval=None) as ws:
        messages: list[dict[str, Any]] = []

        async def read() -> None:
            with contextlib.suppress(websockets.ConnectionClosed):
                async for raw in ws:
                    messages.append(json.loads(raw))

        reader = asyncio.create_task(read())
        deadline = asyncio.get_running_loop().time() + hold_s
        while asyncio.get_running_loop().time() < deadline and reader.done() is False:
            if pings:
                await ws.ping()
            await asyncio.sleep(0.25)
        if not reader.done():
            await ws.send("END")
        await asyncio.wait_for(reader, seconds(30))
        return messages, ws.close_code


def test_websocket_pings_reset_the_idle_timer(make_settings: Callable[..., Settings]) -> None:
    """Protocol pings keep a silent session open past IDLE_TIMEOUT_S; without them it closes with 4408."""
    app = create_app(make_settings(idle_timeout_s=1.0))
    with LiveServer(app) as server:
        messages, code = asyncio.run(hold_with(server.url, pings=True, hold_s=seconds(2.5)))
        assert code == 1000 and messages[-1]["status"] == "completed"
        assert [m for m in messages if m["type"] == "error"] == []
        messages, code = asyncio.run(hold_with(server.url, pings=False, hold_s=seconds(2.5)))
        assert code == 4408
        assert messages[1] == {"type": "error", "code": "idle_timeout", "message": "no data for 1 s"}
