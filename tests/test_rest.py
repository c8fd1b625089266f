"""POST /v1/audio/transcriptions through the app: the same texts as a live session, OpenAI's shapes."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from main import create_app
from real_time_audio.api.transcripts import Cue, render_cues
from real_time_audio.audio.files import encode, load_audio
from real_time_audio.config import Settings
from real_time_audio.storage.recorder import wav_header
from rta_client.offline import transcribe_offline
from tests.conftest import finals, frames, is_status, needs_espeak, pcm16, receive_until, seconds, speech_like

pytestmark = pytest.mark.slow  # integration: real servers, sessions or models

URL = "/v1/audio/transcriptions"
# A live session that never gets to a partial decodes exactly the windows an upload does.
NO_PARTIALS = {"partial_interval_ms": 3_600_000}


def post(
    client: TestClient,
    data: bytes,
    filename: str = "speech.wav",
    fields: dict[str, Any] | None = None,
    **options: Any,
) -> httpx.Response:

    return client.post(URL, files={"file": (filename, data, "application/octet-stream")}, data=fields, **options)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    return body["error"]  # type: ignore[no-any-return]


def live_session(client: TestClient, data: bytes, encoding: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Stream `data` through /ws/transcribe; returns the completed message and the finals."""
    with client.websocket_connect(f"/ws/transcribe?encoding={encoding}&interim_results=false") as ws:
        assert ws.receive_json()["status"] == "connected"
        for chunk in frames(data):
            ws.send_bytes(chunk)
        ws.send_text("END")
        messages = receive_until(ws, is_status("completed"))
    return messages[-1], finals(messages)


def record_of(settings: Settings, session_id: str) -> Path:
    folder = settings.audio_storage_dir / session_id
    assert folder.is_dir()
    return folder


@pytest.fixture
def app_client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(**NO_PARTIALS))) as client:
        yield client


# -- what an upload returns ---------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["wav", "webm", "mp3", "flac"])
def test_upload_gives_what_a_live_session_gives(app_client: TestClient, encoding: str) -> None:
    """An upload of a file is transcribed exactly as a live session streaming the same file."""
    data = encode(speech_like(seed=2, duration_s=6.0), 16000, encoding)
    completed, expected = live_session(app_client, data, encoding)
    response = post(
        app_client,
        data,
        f"speech.{encoding}",
        {"response_format": "verbose_json", "timestamp_granularities[]": ["segment", "word"], "model": "whisper-1"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] and body["text"] == completed["text"]
    assert body["duration"] == completed["duration"]
    assert (body["task"], body["language"]) == ("transcribe", expected[0]["language"])
    got = [(s["id"], s["start"], s["end"], s["text"]) for s in body["segments"]]
    assert got == [(f["segment_id"], f["start"], f["end"], f["text"]) for f in expected]
    assert body["words"] == [word for final in expected for word in final["words"]]


def test_the_format_comes_from_the_name_or_else_the_first_bytes(client: TestClient, settings: Settings) -> None:
    """A WAV without a suffix, or named as something it is not, is recognised by its RIFF header
    and transcribed as the properly named file is."""
    data = encode(speech_like(seed=4, duration_s=2.0), 16000, "wav")
    named = post(client, data, "speech.wav")
    assert named.status_code == 200 and named.json()["text"]
    for filename in ("recording", "speech.mp3", "speech.raw"):
        response = post(client, data, filename)
        assert response.status_code == 200 and response.json() == named.json(), filename
        folder = record_of(settings, response.headers["x-session-id"])
        assert (folder / "audio.wav").read_bytes() == data


def test_every_response_format(app_client: TestClient) -> None:
    """json, text, srt, vtt and verbose_json carry the same segments, each in its exact layout."""
    data = encode(speech_like(seed=5, duration_s=4.0), 16000, "wav")
    fields = {"language": "en", "prompt": "hello", "temperature": "0.2"}
    verbose = post(app_client, data, fields={**fields, "response_format": "verbose_json"})
    assert verbose.status_code == 200 and verbose.headers["content-type"] == "application/json"
    body = verbose.json()
    segments = body["segments"]
    assert segments and body["language"] == "en" and "words" not in body
    assert set(body) == {"task", "language", "duration", "text", "segments"}
    for index, segment in enumerate(segments):
        assert segment["id"] == index
        assert set(segment) == {
            "id", "seek", "start", "end", "text", "temperature", "avg_logprob", "compression_ratio", "no_speech_prob"
        }  # fmt: skip
        assert segment["seek"] == 0 and segment["temperature"] == 0.0  # one window from the start
    text = " ".join(s["text"] for s in segments)
    assert body["text"] == text

    def clock(seconds: float, mark: str) -> str:
        millis = round(seconds * 1000)
        return (
            f"{millis // 3_600_000:02d}:{millis // 60_000 % 60:02d}:{millis // 1000 % 60:02d}{mark}{millis % 1000:03d}"
        )

    srt = "\n".join(
        f"{n}\n{clock(s['start'], ',')} --> {clock(s['end'], ',')}\n{s['text']}\n" for n, s in enumerate(segments, 1)
    )
    vtt = "WEBVTT\n\n" + "\n".join(
        f"{clock(s['start'], '.')} --> {clock(s['end'], '.')}\n{s['text']}\n" for s in segments
    )
    for fmt, expected in (("text", text + "\n"), ("srt", srt), ("vtt", vtt)):
        response = post(app_client, data, fields={**fields, "response_format": fmt})
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert response.text == expected, fmt
    default = post(app_client, data, fields=fields)
    assert default.status_code == 200 and default.json() == {"text": text}


def test_cue_layouts() -> None:
    """SRT and WebVTT times, numbering and blank-text cues, on fixed values."""
    cues = [Cue(0.0, 1.5, "hello"), Cue(2.0, 2.5, "  "), Cue(61.25, 3725.0044, " world ")]
    assert render_cues(cues, "text") == "hello world\n"
    assert render_cues(cues, "srt") == (
        "1\n00:00:00,000 --> 00:00:01,500\nhello\n\n2\n00:01:01,250 --> 01:02:05,004\nworld\n"
    )
    assert render_cues(cues, "vtt") == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nhello\n\n00:01:01.250 --> 01:02:05.004\nworld\n"
    )
    assert render_cues([], "srt") == "" and render_cues([], "vtt") == "WEBVTT\n\n"


@needs_espeak
def test_speech_with_voice_activity_gives_what_stt_gives(
    make_settings: Callable[..., Settings], say: Callable[[str], np.ndarray], tmp_path: Path
) -> None:
    """With Silero VAD on, two utterances and the pause between them come out as the offline `stt`
    command (the same pipeline without a server) transcribes them."""
    settings = make_settings(vad="silero", context_audio_s=0, **NO_PARTIALS)  # each utterance decoded alone
    pause, first = np.zeros(24000, dtype=np.float32), say("the weather is nice today")
    speech = np.concatenate([pause, first, pause, say("see you tomorrow"), pause])
    second_at = (2 * len(pause) + len(first)) / 16000
    source = tmp_path / "speech.wav"
    source.write_bytes(encode(speech, 16000, "wav"))
    expected = transcribe_offline(load_audio(source), settings, None, "transcribe")
    with TestClient(create_app(settings)) as client:
        response = post(client, source.read_bytes(), fields={"response_format": "verbose_json"})
    assert response.status_code == 200, response.text
    segments = response.json()["segments"]
    # One final per utterance, each decoded from where its speech began (less VAD_PAD_MS).
    assert [f["segment_id"] for f in expected] == [0, 1]
    pad = settings.vad_pad_ms / 1000
    assert expected[0]["start"] >= 1.5 - pad and expected[1]["start"] >= second_at - pad
    assert [(s["id"], s["start"], s["end"], s["text"]) for s in segments] == [
        (f["segment_id"], f["start"], f["end"], f["text"]) for f in expected
    ]


# -- the record ---------------------------------------------------------------------------------


def test_an_upload_is_kept_as_a_session_record(app_client: TestClient) -> None:
    """The bytes as received, status completed, source rest, the finals in transcript.jsonl; the
    session-end hooks get the id while the upload still counts toward the session limit."""
    app: Any = app_client.app
    ended: list[tuple[str, int]] = []
    app.state.server.session_end_hooks.append(
        lambda session_id: ended.append((session_id, app.state.server.rest_active))
    )
    data = encode(speech_like(seed=3, duration_s=3.0), 16000, "webm")
    response = post(app_client, data, "meeting.webm", {"response_format": "verbose_json"})
    assert response.status_code == 200
    session_id = response.headers["x-session-id"]
    assert ended == [(session_id, 1)] and app.state.server.rest_active == 0
    folder = record_of(app.state.server.settings, session_id)
    assert (folder / "audio.webm").read_bytes() == data
    meta = json.loads((folder / "session.json").read_text())
    assert (meta["status"], meta["source"], meta["session_id"]) == ("completed", "rest", session_id)
    assert (meta["bytes"], meta["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert (meta["config"]["encoding"], meta["audio_file"]) == ("webm", "audio.webm")
    assert meta["upload"] == {
        "filename": "meeting.webm",
        "content_type": "application/octet-stream",
        "response_format": "verbose_json",
    }
    body = response.json()
    assert (meta["duration"], meta["segments"]) == (body["duration"], len(body["segments"]))
    lines = [json.loads(line) for line in (folder / "transcript.jsonl").read_text().splitlines()]
    assert [(r["segment_id"], r["start"], r["end"], r["text"], r["language"]) for r in lines] == [
        (s["id"], s["start"], s["end"], s["text"], body["language"]) for s in body["segments"]
    ]
    assert all(r["words"] for r in lines)


# -- access and limits --------------------------------------------------------------------------


def test_a_token_is_required_in_the_header_or_the_query(make_settings: Callable[..., Settings]) -> None:
    """401 in OpenAI's shape without a valid token; Authorization: Bearer and ?token= both pass."""
    data = encode(speech_like(seed=1, duration_s=1.0), 16000, "wav")
    with TestClient(create_app(make_settings(api_tokens="s3cret"))) as client:
        missing = post(client, data)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert error_of(missing) == {
            "message": "a token is required: send 'Authorization: Bearer <token>' or ?token=<token>",
            "type": "invalid_request_error",
            "param": None,
            "code": "unauthorized",
        }
        wrong = post(client, data, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and error_of(wrong)["message"] == "the token is not valid"
        assert post(client, data, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert post(client, data, params={"token": "s3cret"}).status_code == 200


def test_a_foreign_origin_is_forbidden(make_settings: Callable[..., Settings]) -> None:
    """403 for a browser origin outside ALLOWED_ORIGINS; an allowed one can read X-Session-Id."""
    data = encode(speech_like(seed=1, duration_s=1.0), 16000, "wav")
    with TestClient(create_app(make_settings(allowed_origins="https://app.example.com"))) as client:
        foreign = post(client, data, headers={"Origin": "https://evil.example.com"})
        assert foreign.status_code == 403
        assert error_of(foreign) == {
            "message": "origin 'https://evil.example.com' is not allowed to use this server",
            "type": "invalid_request_error",
            "param": None,
            "code": "forbidden_origin",
        }
        allowed = post(client, data, headers={"Origin": "https://app.example.com"})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-expose-headers"] == "X-Session-Id"


def test_uploads_over_the_limit_are_refused_with_413(make_settings: Callable[..., Settings]) -> None:
    """A file of MAX_UPLOAD_BYTES passes; one byte more is 413, whether the body's length is
    declared (refused before reading) or streamed in chunks (reading stops at the limit)."""
    settings = make_settings(max_upload_bytes=1024)
    exactly = wav_header("pcm_s16le", 16000, 1, 980) + pcm16(speech_like(seed=1, duration_s=490 / 16000))
    assert len(exactly) == 1024
    too_large = {"message": "the file is larger than the limit of 1024 bytes", "code": "too_large", "param": "file"}
    with TestClient(create_app(settings)) as client:
        assert post(client, exactly).status_code == 200
        for data in (exactly + b"\0", b"\0" * 500_000):
            response = post(client, data)
            assert response.status_code == 413
            assert error_of(response) == {**too_large, "type": "invalid_request_error"}
        form = httpx.Request("POST", "http://test" + URL, files={"file": ("big.wav", b"\0" * 500_000)})
        body = form.read()

        def chunked() -> Iterator[bytes]:
            yield from (body[i : i + 65536] for i in range(0, len(body), 65536))

        response = client.post(URL, content=chunked(), headers={"content-type": form.headers["content-type"]})
        assert response.status_code == 413 and error_of(response)["code"] == "too_large"
        assert len(list(settings.audio_storage_dir.iterdir())) == 1  # only the accepted upload left a record


@pytest.mark.parametrize(
    ("filename", "data", "fields", "param", "code", "message"),
    [
        (
            "junk.bin",
            b"this is not audio, " * 8,
            {},
            "file",
            "bad_audio",
            "the format of 'junk.bin' is not recognised: expected a .wav, .webm, .ogg, .mp4 (.m4a), .mp3 or .flac "
            "file, named so or starting with its usual header; the file starts with 74 68 69 73 20 69 73 20",
        ),
        (
            "voice.raw",
            pcm16(speech_like(seed=1, duration_s=1.0)),
            {},
            "file",
            "unsupported_format",
            "'voice.raw' is raw PCM, which does not say its sample rate or channels: upload a .wav, .webm, .ogg, "
            ".mp4 (.m4a), .mp3 or .flac file instead (or stream raw PCM over /ws/transcribe)",
        ),
        ("empty.wav", b"", {}, "file", "bad_audio", "the uploaded file is empty"),
        (
            "speech.wav",
            None,
            {"response_format": "xml"},
            "response_format",
            "invalid_value",
            "response_format 'xml' is not supported; use one of: json, text, srt, vtt, verbose_json",
        ),
        (
            "speech.wav",
            None,
            {"language": "klingon"},
            "language",
            "invalid_value",
            "language: must be an ISO language code such as 'en', or null to detect",
        ),
        (
            "speech.wav",
            None,
            {"language": "xx"},
            "language",
            "invalid_value",
            "language: 'xx' is not supported by this model",
        ),
        (
            "speech.wav",
            None,
            {"timestamp_granularities[]": "sentence"},
            "timestamp_granularities[]",
            "invalid_value",
            "timestamp_granularities[] 'sentence' is not supported; use segment and/or word",
        ),
    ],
)
def test_bad_requests_are_400_naming_what_was_expected(
    client: TestClient,
    settings: Settings,
    filename: str,
    data: bytes | None,
    fields: dict[str, str],
    param: str,
    code: str,
    message: str,
) -> None:
    """Unusable files and invalid fields are refused before anything is decoded or stored."""
    audio = encode(speech_like(seed=1, duration_s=1.0), 16000, "wav") if data is None else data
    response = post(client, audio, filename, fields)
    assert response.status_code == 400
    assert error_of(response) == {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    assert "x-session-id" not in response.headers
    assert list(settings.audio_storage_dir.iterdir()) == []


def test_undecodable_audio_is_400_and_kept(client: TestClient, settings: Settings) -> None:
    """A file named .wav that is not one is refused with what a WAV starts with; like any session's
    audio, its bytes are kept (status bad_audio)."""
    junk = b"this is not audio, " * 8
    response = post(client, junk, "speech.wav")
    assert response.status_code == 400
    assert error_of(response) == {
        "message": "the file could not be decoded as wav: the stream does not look like wav: it should start "
        "with a RIFF/WAVE header, got 74 68 69 73 20 69 73 20",
        "type": "invalid_request_error",
        "param": "file",
        "code": "bad_audio",
    }
    folder = record_of(settings, response.headers["x-session-id"])
    meta = json.loads((folder / "session.json").read_text())
    assert (meta["status"], meta["bytes"], meta["sha256"]) == ("bad_audio", len(junk), hashlib.sha256(junk).hexdigest())
    assert (folder / "transcript.jsonl").read_text() == ""


def test_requests_that_are_not_forms_are_400(client: TestClient) -> None:
    """A JSON body, or a form without the file, says what the endpoint expects."""
    response = client.post(URL, json={"file": "speech.wav"})
    assert response.status_code == 400
    assert error_of(response) == {
        "message": "the body must be multipart/form-data with the audio in a 'file' field, not 'application/json'",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_content_type",
    }
    response = client.post(URL, files={"model": (None, "whisper-1")})
    assert response.status_code == 400
    assert error_of(response) == {
        "message": "the audio is missing: send it as a file in the 'file' field",
        "type": "invalid_request_error",
        "param": "file",
        "code": "missing_field",
    }


def test_the_session_limit_is_429_with_retry_after(make_settings: Callable[..., Settings]) -> None:
    """Uploads and live sessions share MAX_SESSIONS; a full server asks to retry later."""
    data = encode(speech_like(seed=1, duration_s=1.0), 16000, "wav")
    with TestClient(create_app(make_settings(max_sessions=1))) as client:
        with client.websocket_connect("/ws/transcribe") as ws:
            assert ws.receive_json()["status"] == "connected"
            busy = post(client, data)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "5"
            assert error_of(busy) == {
                "message": "the server is at its limit of 1 concurrent sessions and transcriptions; try again in 5 s",
                "type": "rate_limit_error",
                "param": None,
                "code": "server_busy",
            }
            ws.send_text("END")
            receive_until(ws, is_status("completed"))
        deadline = time.monotonic() + seconds(10)
        while client.app.state.server.sessions and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)
        assert post(client, data).status_code == 200


def test_503_while_draining_or_without_an_engine(client: TestClient) -> None:
    """A server shutting down, or whose engine is not running, refuses uploads with 503."""
    data = encode(speech_like(seed=1, duration_s=1.0), 16000, "wav")
    state: Any = client.app.state.server  # type: ignore[attr-defined]
    state.draining = True
    response = post(client, data)
    assert response.status_code == 503
    assert error_of(response) == {
        "message": "the server is shutting down; try again shortly",
        "type": "server_error",
        "param": None,
        "code": "shutting_down",
    }
    state.draining = False
    state.engine._die("device failure: test")
    response = post(client, data)
    assert response.status_code == 503
    assert error_of(response)["message"] == "the transcription engine is not available: device failure: test"
    assert state.rest_active == 0


def test_uploads_count_toward_the_per_address_limit(make_settings: Callable[..., Settings]) -> None:
    """MAX_CONNECTIONS_PER_CLIENT covers uploads too: with one WebSocket open, the same address's upload gets 429."""
    settings = make_settings(max_connections_per_client=1)
    wav = encode(speech_like(2, 1.0), 16000, "wav")
    with TestClient(create_app(settings)) as client:
        with client.websocket_connect("/ws/transcribe") as ws:
            ws.receive_json()
            refused = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav)})
            ws.send_json({"type": "end"})
            receive_until(ws, is_status("completed"))
        assert refused.status_code == 429
        assert refused.json()["error"] == {
            "message": "too many connections from testclient: the limit is 1 at a time",
            "type": "rate_limit_error",
            "param": None,
            "code": "server_busy",
        }
        assert client.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav)}).status_code == 200


@pytest.mark.parametrize("enabled", [True, False])
def test_api_documentation_is_a_setting(make_settings: Callable[..., Settings], enabled: bool) -> None:
    with TestClient(create_app(make_settings(api_docs=enabled))) as client:
        statuses = [client.get(path).status_code for path in ("/docs", "/redoc", "/openapi.json")]
    assert statuses == ([200, 200, 200] if enabled else [404, 404, 404])
