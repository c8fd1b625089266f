"""`/ws/echo`: the audio comes back unchanged, in order, after the delay."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

pytestmark = pytest.mark.slow  # integration: real servers, sessions or models


def test_frames_come_back_unchanged_in_order_after_the_delay(client: TestClient) -> None:
    frames = [bytes([index]) * (100 + index) for index in range(20)]
    with client.websocket_connect("/ws/echo?delay=0.3&encoding=webm") as ws:
        hello = ws.receive_json()
        assert hello["type"] == "status" and hello["status"] == "connected" and hello["protocol"] == 1
        assert hello["delay"] == 0.3 and hello["config"]["encoding"] == "webm"
        sent_at = time.monotonic()
        for frame in frames:
            ws.send_bytes(frame)
        first = ws.receive_bytes()
        assert time.monotonic() - sent_at >= 0.29  # held back for the delay
        echoed = [first] + [ws.receive_bytes() for _ in frames[1:]]
        ws.send_text("END")
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_bytes()
    assert echoed == frames
    assert closed.value.code == 1000


def test_end_sends_what_is_still_waiting_then_closes(client: TestClient) -> None:
    with client.websocket_connect("/ws/echo?delay=0.2") as ws:
        assert ws.receive_json()["delay"] == 0.2
        ws.send_bytes(b"abc")
        ws.send_text('{"type": "keepalive"}')
        ws.send_text('{"type": "end"}')
        assert ws.receive_bytes() == b"abc"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_bytes()
    assert closed.value.code == 1000


def test_default_delay_and_config(client: TestClient) -> None:
    with client.websocket_connect("/ws/echo") as ws:
        hello = ws.receive_json()
        ws.send_text("END")
    assert hello["delay"] == 1.0
    assert hello["config"] == {
        "encoding": "pcm_s16le",
        "sample_rate": 16000,
        "channels": 1,
        "chunk_samples": 4096,
        "language": None,
        "task": "transcribe",
        "interim_results": True,
    }


def test_bad_parameters_and_messages_are_reported(client: TestClient) -> None:
    with client.websocket_connect("/ws/echo?delay=99&channels=5") as ws:
        hello = ws.receive_json()
        assert hello["delay"] == 1.0
        assert ws.receive_json() == {
            "type": "error",
            "code": "bad_config",
            "message": "delay: must be a number of seconds from 0 to 10, got '99'",
        }
        assert ws.receive_json()["message"] == "invalid config: channels: Input should be 1 or 2"
        ws.send_text('{"type": "flush"}')
        assert ws.receive_json() == {
            "type": "error",
            "code": "bad_message",
            "message": "/ws/echo takes audio, keepalive and END; not flush",
        }
        ws.send_text("END")


def test_a_frame_over_the_limit_closes_with_1009(client: TestClient) -> None:
    limit = client.app.state.server.settings.max_frame_bytes  # type: ignore[attr-defined]
    with client.websocket_connect("/ws/echo?delay=0") as ws:
        ws.receive_json()
        ws.send_bytes(bytes(limit + 1))
        assert ws.receive_json()["code"] == "too_large"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 1009
