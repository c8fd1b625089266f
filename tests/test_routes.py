"""The `/ws/transcribe` protocol through the app (TestClient runs the lifespan and the real model)."""

from __future__ import annotations

import hashlib
import json
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from main import create_app
from real_time_audio.config import Settings
from tests.conftest import (
    assert_finals_within,
    finals,
    frames,
    is_status,
    pcm16,
    receive_until,
    record_decode_lengths,
    speech_like,
)

pytestmark = pytest.mark.slow  # integration: real servers, sessions or models

CONFIG_KEYS = {"encoding", "sample_rate", "channels", "chunk_samples", "language", "task", "interim_results"}


def send_all(ws: Any, data: bytes, size: int = 8192) -> None:
    for chunk in frames(data, size):
        ws.send_bytes(chunk)


def end_session(ws: Any) -> list[dict[str, Any]]:
    ws.send_text("END")
    messages = receive_until(ws, is_status("completed"))
    with pytest.raises(WebSocketDisconnect) as info:
        ws.receive_json()
    assert info.value.code == 1000
    return messages


def expect_close(ws: Any, code: int) -> None:
    with pytest.raises(WebSocketDisconnect) as info:
        ws.receive_json()
    assert info.value.code == code


def test_health_and_ready(client: TestClient, checkpoint_dir: Path) -> None:
    """/health is alive; /ready reports the loaded model once the lifespan has started the engine."""
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    body = {"status": "ready", "model": str(checkpoint_dir), "device": "cpu", "sessions": 0, "max_sessions": 32}
    assert ready.json() == body


def test_ready_is_503_when_the_engine_is_dead(client: TestClient) -> None:
    """A dead engine turns /ready to 503 with its reason, and new sessions are refused with 1011."""
    engine = client.app.state.server.engine  # type: ignore[attr-defined]
    engine._die("device failure: test")
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "reason": "device failure: test"}
    health = client.get("/health")  # liveness fails too: only a restart cures a dead engine
    assert (health.status_code, health.json()) == (503, {"status": "dead", "reason": "device failure: test"})
    with client.websocket_connect("/ws/transcribe") as ws:
        assert ws.receive_json() == {
            "type": "error",
            "code": "internal",
            "message": "the transcription engine is not available",
        }
        expect_close(ws, 1011)


def test_connected_message(client: TestClient, checkpoint_dir: Path, settings: Settings) -> None:
    """The first message says who we are and the session's effective config; a folder is made for it."""
    with client.websocket_connect("/ws/transcribe") as ws:
        hello = ws.receive_json()
        assert hello["type"] == "status" and hello["status"] == "connected" and hello["protocol"] == 1
        assert set(hello["config"]) == CONFIG_KEYS
        assert hello["config"] == {
            "encoding": "pcm_s16le",
            "sample_rate": 16000,
            "channels": 1,
            "chunk_samples": 4096,
            "language": None,
            "task": "transcribe",
            "interim_results": True,
        }
        assert (hello["model"], hello["device"]) == (str(checkpoint_dir), "cpu")
        assert len(hello["session_id"]) == 32
        assert (settings.audio_storage_dir / hello["session_id"] / "session.json").exists()
        end_session(ws)


def test_full_session_persists_exactly_what_was_sent(client: TestClient, settings: Settings) -> None:
    """END gives finals then `completed`; the sha256 and WAV data equal the bytes the client sent."""
    audio = pcm16(speech_like(11, 4.0))
    with client.websocket_connect("/ws/transcribe") as ws:
        session_id = ws.receive_json()["session_id"]
        send_all(ws, audio, 3000)
        messages = end_session(ws)
    done = messages[-1]
    final_texts = [m["text"] for m in finals(messages)]
    assert final_texts and all(final_texts)
    digest = hashlib.sha256(audio).hexdigest()
    folder = settings.audio_storage_dir / session_id
    assert done == {
        "type": "status",
        "status": "completed",
        "session_id": session_id,
        "text": " ".join(final_texts),
        "duration": 4.0,
        "segments": len(final_texts),
        "recording": {"audio": f"/sessions/{session_id}/audio", "bytes": len(audio), "sha256": digest},
    }
    with wave.open(str(folder / "audio.wav")) as wav:
        assert wav.readframes(wav.getnframes()) == audio
    meta = json.loads((folder / "session.json").read_text())
    assert (meta["sha256"], meta["bytes"], meta["status"]) == (digest, len(audio), "completed")
    assert meta["config"]["encoding"] == "pcm_s16le" and meta["model"] and meta["device"] == "cpu"
    lines = [json.loads(line) for line in (folder / "transcript.jsonl").read_text().splitlines()]
    assert [line["text"] for line in lines] == final_texts


def test_config_message_and_float_stereo_audio(client: TestClient, settings: Settings) -> None:
    """A config for 44.1 kHz float stereo is echoed, and that audio is transcribed and stored as sent."""
    mono = speech_like(5, 2.0, rate=44100)
    stereo = np.stack([mono, mono], axis=1).astype("<f4").tobytes()
    with client.websocket_connect("/ws/transcribe") as ws:
        session_id = ws.receive_json()["session_id"]
        ws.send_text(
            json.dumps(
                {
                    "type": "config",
                    "encoding": "pcm_f32le",
                    "sample_rate": 44100,
                    "channels": 2,
                    "language": "en",
                    "interim_results": False,
                }
            )
        )
        configured = ws.receive_json()
        assert configured == {
            "type": "status",
            "status": "configured",
            "config": {
                "encoding": "pcm_f32le",
                "sample_rate": 44100,
                "channels": 2,
                "chunk_samples": 4096,
                "language": "en",
                "task": "transcribe",
                "interim_results": False,
            },
        }
        send_all(ws, stereo, 44100 * 8 // 4)
        messages = end_session(ws)
    assert all(m["is_final"] for m in messages if m["type"] == "transcription")
    assert [m["language"] for m in assert_finals_within(messages, 0.0, 2.0)] == ["en"]
    assert messages[-1]["duration"] == 2.0
    assert messages[-1]["recording"]["sha256"] == hashlib.sha256(stereo).hexdigest()
    info = sf.info(str(settings.audio_storage_dir / session_id / "audio.wav"))
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (44100, 2, "FLOAT", 88200)


def test_query_parameters_configure_the_session(client: TestClient) -> None:
    """Query parameters set the config without a first message (as browsers need)."""
    with client.websocket_connect("/ws/transcribe?sample_rate=8000&language=de&interim_results=false") as ws:
        config = ws.receive_json()["config"]
        assert (config["sample_rate"], config["language"], config["interim_results"]) == (8000, "de", False)
        end_session(ws)


def test_bad_query_parameter_keeps_defaults(client: TestClient) -> None:
    """An invalid query parameter gets bad_config after `connected`; the session stays usable."""
    with client.websocket_connect("/ws/transcribe?sample_rate=96000") as ws:
        assert ws.receive_json()["config"]["sample_rate"] == 16000
        error = ws.receive_json()
        assert error["code"] == "bad_config" and "sample_rate" in error["message"]
        send_all(ws, pcm16(speech_like(1, 1.0)))
        assert end_session(ws)[-1]["duration"] == 1.0


@pytest.mark.parametrize(
    ("payload", "code", "fragment"),
    [
        ("not json", "bad_message", "text frames must be JSON objects"),
        ('{"type": "sing"}', "bad_message", "unknown message type 'sing'"),
        ('{"type": "config", "speed": 2}', "bad_config", "speed: unknown field"),
        ('{"type": "config", "sample_rate": 100}', "bad_config", "sample_rate"),
        ('{"type": "config", "language": "xx"}', "bad_config", "language: 'xx' is not supported by this model"),
        ('{"type": "config", "encoding": "aiff"}', "bad_config", "encoding: Input should be 'pcm_s16le'"),
    ],
)
def test_bad_messages_keep_the_session_open(client: TestClient, payload: str, code: str, fragment: str) -> None:
    """Each bad text frame gets its error code; audio before and after it is all kept."""
    first, second = pcm16(speech_like(2, 0.5)), pcm16(speech_like(3, 0.5))
    with client.websocket_connect("/ws/transcribe?interim_results=false") as ws:
        ws.receive_json()
        if code == "bad_message":
            ws.send_bytes(first)
        ws.send_text(payload)
        error = ws.receive_json()
        assert error["type"] == "error" and error["code"] == code and fragment in error["message"]
        if code != "bad_message":
            ws.send_bytes(first)
        ws.send_bytes(second)
        done = end_session(ws)[-1]
    assert done["recording"]["sha256"] == hashlib.sha256(first + second).hexdigest()


def test_config_after_audio_is_refused(client: TestClient) -> None:
    """The format is fixed by the first audio frame; a later config is bad_config and changes nothing."""
    with client.websocket_connect("/ws/transcribe?interim_results=false") as ws:
        ws.receive_json()
        ws.send_bytes(pcm16(speech_like(1, 0.5)))
        ws.send_text(json.dumps({"type": "config", "sample_rate": 8000}))
        assert ws.receive_json() == {
            "type": "error",
            "code": "bad_config",
            "message": "config must come before the first audio frame",
        }
        assert end_session(ws)[-1]["duration"] == 0.5


@pytest.mark.parametrize(("encoding", "bad_size"), [("pcm_s16le", 1001), ("pcm_f32le", 1002)])
def test_partial_sample_frame_is_bad_audio(client: TestClient, encoding: str, bad_size: int) -> None:
    """A frame that is not a whole number of samples is rejected; valid audio around it is kept."""
    good = pcm16(speech_like(4, 0.5)) if encoding == "pcm_s16le" else speech_like(4, 0.5).astype("<f4").tobytes()
    with client.websocket_connect(f"/ws/transcribe?encoding={encoding}&interim_results=false") as ws:
        ws.receive_json()
        ws.send_bytes(good)
        ws.send_bytes(b"\x01" * bad_size)
        error = ws.receive_json()
        assert error["code"] == "bad_audio" and f"got {bad_size}" in error["message"]
        ws.send_bytes(good)
        done = end_session(ws)[-1]
    assert done["recording"]["bytes"] == 2 * len(good)
    assert done["recording"]["sha256"] == hashlib.sha256(good + good).hexdigest()


def test_frame_over_the_limit_closes_with_1009(make_settings: Callable[..., Settings]) -> None:
    """A frame larger than MAX_FRAME_BYTES gets too_large and close 1009; earlier audio is on disk."""
    settings = make_settings(max_frame_bytes=4096)
    good = pcm16(speech_like(1, 0.1))
    with TestClient(create_app(settings)) as client, client.websocket_connect("/ws/transcribe") as ws:
        session_id = ws.receive_json()["session_id"]
        ws.send_bytes(good)
        ws.send_bytes(b"\0" * 4098)
        messages = receive_until(ws, lambda m: m["type"] == "error")
        assert messages[-1] == {
            "type": "error",
            "code": "too_large",
            "message": "binary frame of 4098 bytes exceeds the limit of 4096 bytes",
        }
        expect_close(ws, 1009)
    meta = json.loads((settings.audio_storage_dir / session_id / "session.json").read_text())
    assert (meta["status"], meta["bytes"]) == ("frame_too_large", len(good))


def test_session_limit_closes_with_1013(make_settings: Callable[..., Settings]) -> None:
    """One session over MAX_SESSIONS gets server_busy and close 1013; the others are unaffected."""
    settings = make_settings(max_sessions=2, queue_max_size=2)
    with TestClient(create_app(settings)) as client:
        with client.websocket_connect("/ws/transcribe") as a, client.websocket_connect("/ws/transcribe") as b:
            a.receive_json()
            b.receive_json()
            # Full: /ready sends load balancers elsewhere, /health still says the process is fine.
            ready = client.get("/ready")
            assert (ready.status_code, ready.json()) == (
                503,
                {"status": "unavailable", "reason": "at capacity: 2 of 2 sessions", "sessions": 2, "max_sessions": 2},
            )
            assert client.get("/health").json() == {"status": "ok"}
            metrics = client.get("/metrics").text
            assert "rta_session_load 1.0" in metrics.splitlines()
            assert "rta_accepting_sessions 0.0" in metrics.splitlines()
            with client.websocket_connect("/ws/transcribe") as c:
                assert c.receive_json() == {
                    "type": "error",
                    "code": "server_busy",
                    "message": "the server is at its limit of 2 sessions; try again later",
                }
                expect_close(c, 1013)
            end_session(a)
            end_session(b)
        assert client.get("/ready").status_code == 200
        with client.websocket_connect("/ws/transcribe") as d:  # capacity is back
            assert d.receive_json()["status"] == "connected"
            metrics = client.get("/metrics").text.splitlines()
            assert "rta_session_load 0.5" in metrics and "rta_accepting_sessions 1.0" in metrics
            end_session(d)


def test_idle_session_closes_with_4408(make_settings: Callable[..., Settings]) -> None:
    """No data for IDLE_TIMEOUT_S gets idle_timeout and close 4408; keepalives hold it open meanwhile."""
    settings = make_settings(idle_timeout_s=0.6)
    with TestClient(create_app(settings)) as client, client.websocket_connect("/ws/transcribe") as ws:
        session_id = ws.receive_json()["session_id"]
        for _ in range(4):  # 1.6 s in all, but never 0.6 s without a message
            time.sleep(0.4)
            ws.send_text('{"type": "keepalive"}')
        assert ws.receive_json() == {"type": "error", "code": "idle_timeout", "message": "no data for 0.6 s"}
        expect_close(ws, 4408)
    meta = json.loads((settings.audio_storage_dir / session_id / "session.json").read_text())
    assert meta["status"] == "idle_timeout"


def test_flush_finalizes_and_acknowledges(client: TestClient) -> None:
    """flush: finals for everything so far, then `flushed`; the next text has a higher segment id."""
    with client.websocket_connect("/ws/transcribe?interim_results=false") as ws:
        ws.receive_json()
        send_all(ws, pcm16(speech_like(6, 1.5)))
        ws.send_text('{"type": "flush"}')
        first = receive_until(ws, is_status("flushed"))
        ws.send_text('{"type": "flush"}')  # nothing new: just the acknowledgement
        assert ws.receive_json() == {"type": "status", "status": "flushed"}
        send_all(ws, pcm16(speech_like(7, 1.0)))
        rest = end_session(ws)
    assert [m["segment_id"] for m in assert_finals_within(first, 0.0, 1.5)] == [0]
    assert [m["segment_id"] for m in assert_finals_within(rest, 1.5, 2.5)] == [1]
    assert finals(first)[0]["lag"] == 0.0


def test_partials_then_finals_with_segment_limit(make_settings: Callable[..., Settings]) -> None:
    """Partials arrive while audio streams; no decode covers more than SEGMENT_MAX_S; finals tile in order."""
    settings = make_settings(segment_max_s=2, partial_interval_ms=100)
    with TestClient(create_app(settings)) as client, client.websocket_connect("/ws/transcribe") as ws:
        lengths = record_decode_lengths(client.app.state.server.engine)  # type: ignore[attr-defined]
        ws.receive_json()
        for chunk in frames(pcm16(speech_like(8, 5.0)), 6400):  # 0.2 s frames
            ws.send_bytes(chunk)
            time.sleep(0.05)
        messages = end_session(ws)
    texts = [m for m in messages if m["type"] == "transcription"]
    partials = [m for m in texts if not m["is_final"]]
    assert partials, "expected partial results while streaming"
    assert max(lengths) <= 2 * 16000
    assert [m["segment_id"] for m in assert_finals_within(messages, 0.0, 5.0)] == list(range(len(finals(messages))))
    # a partial never follows the final of its own segment, and segment ids never go back
    final_ids: set[int] = set()
    last_id = 0
    for m in texts:
        assert m["segment_id"] not in final_ids and m["segment_id"] >= last_id
        last_id = m["segment_id"]
        if m["is_final"]:
            final_ids.add(m["segment_id"])
    assert all(0 <= m["lag"] <= 5.0 for m in texts)


def test_a_failing_job_errors_only_its_session(client: TestClient) -> None:
    """If the model fails on one session's audio, that session gets `internal` and stays open."""
    engine = client.app.state.server.engine  # type: ignore[attr-defined]
    real = engine.backend.transcribe_batch

    def flaky(requests: Any) -> Any:
        if any(np.all(r.audio == 0) for r in requests):
            raise RuntimeError("model exploded")
        return real(requests)

    engine.backend.transcribe_batch = flaky
    silence = bytes(16000 * 2)
    with client.websocket_connect("/ws/transcribe?interim_results=false") as ws:
        ws.receive_json()
        ws.send_bytes(silence)
        ws.send_text('{"type": "flush"}')
        error = ws.receive_json()
        assert error == {
            "type": "error",
            "code": "internal",
            "message": "the audio at 0.00-1.00 s could not be transcribed; it is kept in the recording",
        }
        assert ws.receive_json() == {"type": "status", "status": "flushed"}
        send_all(ws, pcm16(speech_like(9, 1.0)))
        messages = end_session(ws)
    assert [m["segment_id"] for m in assert_finals_within(messages, 1.0, 2.0)] == [0]  # nothing was final before
    assert messages[-1]["recording"]["bytes"] == len(silence) + 32000


def test_audio_reaches_disk_within_a_second_while_the_client_pauses(client: TestClient, settings: Settings) -> None:
    """A frame followed by silence from the client is flushed, with a valid WAV header, within ~1 s."""
    audio = pcm16(speech_like(12, 0.5))
    with client.websocket_connect("/ws/transcribe?interim_results=false") as ws:
        session_id = ws.receive_json()["session_id"]
        ws.send_bytes(audio)
        time.sleep(2.5)  # the session is still open and the client sends nothing meanwhile
        with wave.open(str(settings.audio_storage_dir / session_id / "audio.wav")) as wav:
            assert wav.readframes(wav.getnframes()) == audio
        end_session(ws)
