"""Storage lifecycle: retention sweeps, the S3 archive (against a local moto server), GET /sessions/…"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from main import create_app
from real_time_audio.config import Settings
from real_time_audio.storage.archive import ArchiveUnavailableError, SessionArchive
from real_time_audio.storage.retention import RetentionPolicy, StoredSession, scan_sessions, sweep, tree_size
from tests.conftest import finals, frames, free_port, is_status, pcm16, receive_until, seconds, speech_like

pytestmark = pytest.mark.slow  # integration: real servers, sessions or models

DAY = 86400.0
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def sid(number: int) -> str:
    return f"{number:032x}"


def make_record(
    root: Path,
    session_id: str,
    *,
    status: str = "completed",
    ended: datetime | None = NOW,
    audio_bytes: int = 1000,
    suffix: str = ".wav",
) -> Path:
    """A session folder as the recorder leaves it: audio, one final, session.json."""
    folder = root / session_id
    folder.mkdir(parents=True)
    (folder / f"audio{suffix}").write_bytes(os.urandom(audio_bytes))
    final = {"segment_id": 0, "text": "hello there", "start": 0.1, "end": 0.9, "language": "en"}
    (folder / "transcript.jsonl").write_text(json.dumps(final) + "\n", encoding="utf-8")
    metadata = {
        "session_id": session_id,
        "status": status,
        "started_at": (ended or NOW).isoformat(),
        "ended_at": ended.isoformat() if ended else None,
        "audio_file": f"audio{suffix}",
        "bytes": audio_bytes,
    }
    (folder / "session.json").write_text(json.dumps(metadata), encoding="utf-8")
    return folder


def age(folder: Path, days: float) -> None:
    """Set a folder's mtime to `days` before NOW."""
    stamp = NOW.timestamp() - days * DAY
    os.utime(folder, (stamp, stamp))


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + seconds(timeout)
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def logged(caplog: pytest.LogCaptureFixture, level: int, *parts: str) -> list[str]:
    """Messages at `level` that contain every one of `parts`."""
    return [r.getMessage() for r in caplog.records if r.levelno == level and all(p in r.getMessage() for p in parts)]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stream_speech(client: TestClient, seed: int = 11, duration_s: float = 2.0) -> tuple[str, list[dict[str, Any]]]:
    """One complete session through /ws/transcribe: its id and every message after `connected`."""
    with client.websocket_connect("/ws/transcribe") as ws:
        session_id = ws.receive_json()["session_id"]
        for chunk in frames(pcm16(speech_like(seed, duration_s)), 4000):
            ws.send_bytes(chunk)
        ws.send_text("END")
        messages = receive_until(ws, is_status("completed"))
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1000
    return session_id, messages


# -- retention ----------------------------------------------------------------------------------


def test_sweep_deletes_sessions_older_than_the_retention_period(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """By ended_at (else the folder's mtime), oldest first; unrelated files and folders stay."""
    caplog.set_level(logging.INFO, logger="real_time_audio")
    make_record(tmp_path, sid(2), ended=NOW - timedelta(days=10))
    make_record(tmp_path, sid(3), ended=NOW - timedelta(days=5))
    make_record(tmp_path, sid(4), ended=NOW - timedelta(days=1))
    age(make_record(tmp_path, sid(1), ended=None, status="interrupted"), days=20)
    age(make_record(tmp_path, sid(5), ended=None, status="error"), days=2)
    (tmp_path / "notes").mkdir()
    age(tmp_path / "notes", days=30)
    (tmp_path / "README.txt").write_text("not a session")
    damaged = tmp_path / sid(6)
    damaged.mkdir()
    (damaged / "session.json").write_text("{not json")
    age(damaged, days=30)

    result = sweep(tmp_path, RetentionPolicy(max_age_s=3 * DAY), now=NOW.timestamp())

    assert result.deleted_by_age == [sid(1), sid(2), sid(3)]
    assert result.deleted_by_size == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["README.txt", "notes", sid(4), sid(5), sid(6)])
    assert result.total_bytes == tree_size(tmp_path)
    for session_id in (sid(1), sid(2), sid(3)):
        assert len(logged(caplog, logging.INFO, "retention: deleted session", session_id)) == 1
    assert logged(caplog, logging.INFO, "retention sweep: deleted 3 sessions (3 by age, 0 by size)")


def test_sweep_deletes_the_oldest_sessions_while_storage_is_over_its_size_limit(tmp_path: Path) -> None:
    """Oldest finished first, and only as many as needed; other files count toward the size."""
    for number, hours in ((1, 4), (2, 3), (3, 2), (4, 1)):
        make_record(tmp_path, sid(number), ended=NOW - timedelta(hours=hours), audio_bytes=10_000)
    (tmp_path / "other.bin").write_bytes(bytes(5_000))
    one_session = tree_size(tmp_path / sid(1))
    limit = tree_size(tmp_path) - one_session - 1  # one deletion is not quite enough, two are

    result = sweep(tmp_path, RetentionPolicy(max_bytes=limit), now=NOW.timestamp())

    assert (result.deleted_by_age, result.deleted_by_size) == ([], [sid(1), sid(2)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["other.bin", sid(3), sid(4)])
    assert result.freed_bytes == 2 * one_session
    assert result.total_bytes == tree_size(tmp_path) <= limit
    assert result.kept == 2


def test_sweep_never_deletes_live_active_or_unuploaded_sessions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Even far over both limits, only the finished, not-live, uploaded session goes."""
    caplog.set_level(logging.INFO, logger="real_time_audio")
    old = NOW - timedelta(days=30)
    make_record(tmp_path, sid(1), ended=old)  # live: its id is in app.state.server.sessions
    make_record(tmp_path, sid(2), ended=old, status="active")  # a server crash left it "active"
    make_record(tmp_path, sid(3), ended=old)  # not yet uploaded
    make_record(tmp_path, sid(4), ended=old)  # uploaded
    checked: list[str] = []

    def uploaded(folder: Path) -> bool:
        checked.append(folder.name)
        return folder.name == sid(4)

    result = sweep(tmp_path, RetentionPolicy(max_age_s=DAY, max_bytes=1), {sid(1)}, uploaded, now=NOW.timestamp())

    assert result.deleted == [sid(4)]
    assert result.protected == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [sid(1), sid(2), sid(3)]
    assert sorted(checked) == [sid(3), sid(4)]  # live and active ones are not even asked about
    assert logged(caplog, logging.WARNING, "retention: storage holds", "over the limit of 1")


def test_policy_from_settings(make_settings: Callable[..., Settings]) -> None:
    """Days and GB become seconds and bytes; zero turns a limit off."""
    assert RetentionPolicy.from_settings(make_settings()) == RetentionPolicy(None, None)
    assert not RetentionPolicy.from_settings(make_settings()).enabled
    policy = RetentionPolicy.from_settings(make_settings(retention_days=7, retention_max_gb=1.5))
    assert policy == RetentionPolicy(7 * DAY, 1_500_000_000)


def test_retention_runs_at_startup_and_then_periodically(make_settings: Callable[..., Settings]) -> None:
    """The app sweeps when it starts and again every RETENTION_INTERVAL_S; active records stay."""
    settings = make_settings(retention_days=1, retention_interval_s=0.2)
    root = settings.audio_storage_dir
    now = datetime.now(UTC)
    make_record(root, sid(1), ended=now - timedelta(days=3))
    make_record(root, sid(2), ended=now - timedelta(days=3), status="active")
    make_record(root, sid(3), ended=now - timedelta(hours=1))
    with TestClient(create_app(settings)):
        wait_for(lambda: not (root / sid(1)).exists(), "the start-up sweep")
        make_record(root, sid(4), ended=now - timedelta(days=2))
        wait_for(lambda: not (root / sid(4)).exists(), "a periodic sweep")
        assert sorted(p.name for p in root.iterdir()) == [sid(2), sid(3)]


def test_record_without_ended_at_is_dated_by_its_folder_mtime(tmp_path: Path) -> None:
    """scan_sessions reads status and end time from session.json, else the folder's mtime."""
    folder = make_record(tmp_path, sid(1), ended=None)
    age(folder, days=4)
    assert scan_sessions(tmp_path) == [
        StoredSession(sid(1), folder, "completed", NOW.timestamp() - 4 * DAY, tree_size(folder))
    ]


# -- S3 archive ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 API (moto's standalone server) on a free local port, stopped after the module."""
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + seconds(30)
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(seconds(10))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@dataclass(slots=True)
class Bucket:
    name: str
    endpoint: str
    client: Any

    def objects(self) -> dict[str, bytes]:
        listing = self.client.list_objects_v2(Bucket=self.name).get("Contents", [])
        return {o["Key"]: self.client.get_object(Bucket=self.name, Key=o["Key"])["Body"].read() for o in listing}


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials and no AWS config from this machine, so nothing can reach real AWS."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def bucket(moto_endpoint: str, aws_env: None) -> Bucket:
    import boto3

    client = boto3.client("s3", endpoint_url=moto_endpoint)
    name = f"recordings-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return Bucket(name, moto_endpoint, client)


def assert_in_bucket(bucket: Bucket, folder: Path, prefix: str) -> None:
    """The bucket holds exactly the session's files, byte for byte, and the marker says so."""
    session_id = folder.name
    local = sorted(p.name for p in folder.iterdir() if p.name != "uploaded.json")
    assert local == ["audio.wav", "session.json", "transcript.jsonl"]
    stored = bucket.objects()
    assert sorted(stored) == [f"{prefix}{session_id}/{name}" for name in local]
    for name in local:
        assert hashlib.sha256(stored[f"{prefix}{session_id}/{name}"]).hexdigest() == file_digest(folder / name)
    marker = json.loads((folder / "uploaded.json").read_text())
    assert (marker["bucket"], marker["prefix"]) == (bucket.name, prefix)
    assert {o["key"]: o["sha256"] for o in marker["objects"]} == {
        f"{prefix}{session_id}/{name}": file_digest(folder / name) for name in local
    }
    head = bucket.client.head_object(Bucket=bucket.name, Key=f"{prefix}{session_id}/audio.wav")
    assert (head["ContentType"], head["Metadata"]) == ("audio/wav", {"sha256": file_digest(folder / "audio.wav")})


def test_finished_session_is_uploaded_to_s3(make_settings: Callable[..., Settings], bucket: Bucket) -> None:
    """A session streamed through the app ends up in the bucket with the same bytes as on disk."""
    settings = make_settings(s3_bucket=bucket.name, s3_endpoint_url=bucket.endpoint, s3_prefix="rec/")
    with TestClient(create_app(settings)) as client:
        session_id, messages = stream_speech(client)
        folder = settings.audio_storage_dir / session_id
        wait_for(lambda: (folder / "uploaded.json").exists(), "the upload")
        assert_in_bucket(bucket, folder, "rec/")
    # The WAV's data in the bucket is exactly what the client sent (its SHA-256 from `completed`).
    audio = bucket.objects()[f"rec/{session_id}/audio.wav"]
    assert hashlib.sha256(audio[44:]).hexdigest() == messages[-1]["recording"]["sha256"]


def test_shutdown_finishes_queued_uploads(
    make_settings: Callable[..., Settings], bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session that ends just before shutdown is uploaded before the lifespan finishes."""
    real_upload = SessionArchive.upload

    def slow_upload(self: SessionArchive, session_id: str) -> dict[str, Any]:
        time.sleep(0.5)
        return real_upload(self, session_id)

    monkeypatch.setattr(SessionArchive, "upload", slow_upload)
    settings = make_settings(s3_bucket=bucket.name, s3_endpoint_url=bucket.endpoint)
    with TestClient(create_app(settings)) as client:
        session_id, _ = stream_speech(client, seed=3, duration_s=1.0)
        assert not (settings.audio_storage_dir / session_id / "uploaded.json").exists()
    assert_in_bucket(bucket, settings.audio_storage_dir / session_id, "sessions/")


def test_failed_upload_is_logged_kept_and_retried_at_startup(
    make_settings: Callable[..., Settings],
    bucket: Bucket,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With S3 down the failure is logged per attempt, retention keeps the session, the next start uploads it."""
    caplog.set_level(logging.INFO, logger="real_time_audio")
    monkeypatch.setattr(SessionArchive, "RETRY_DELAYS_S", (0.05, 0.1))
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    # Retention would delete any finished session at once (1e-9 days) if it were allowed to.
    settings = make_settings(s3_bucket=bucket.name, s3_endpoint_url=down, retention_days=1e-9, retention_interval_s=0.1)
    with TestClient(create_app(settings)) as client:
        session_id, _ = stream_speech(client, seed=5, duration_s=1.0)
        wait_for(lambda: bool(logged(caplog, logging.ERROR, session_id, "failed after 3 attempts")), "the failure")
        sweeps = len(logged(caplog, logging.INFO, "retention sweep:"))
        wait_for(lambda: len(logged(caplog, logging.INFO, "retention sweep:")) > sweeps, "a sweep after it")
    folder = settings.audio_storage_dir / session_id
    assert folder.is_dir() and not (folder / "uploaded.json").exists()
    assert len(logged(caplog, logging.WARNING, session_id, "attempt 1 of 3")) == 1
    assert len(logged(caplog, logging.WARNING, session_id, "attempt 2 of 3")) == 1
    assert logged(caplog, logging.ERROR, session_id, "it is retried at the next start-up")
    assert bucket.objects() == {}

    restarted = make_settings(s3_bucket=bucket.name, s3_endpoint_url=bucket.endpoint)
    with TestClient(create_app(restarted)):
        wait_for(lambda: (folder / "uploaded.json").exists(), "the upload at start-up")
    assert logged(caplog, logging.INFO, "archive: 1 finished sessions not yet uploaded")
    assert_in_bucket(bucket, folder, "sessions/")


def test_shutdown_gives_up_after_its_timeout(
    make_settings: Callable[..., Settings], aws_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A hung upload does not hold shutdown past the timeout; the session is left for the next start."""
    settings = make_settings(s3_bucket="recordings")
    make_record(settings.audio_storage_dir, sid(1))
    release = threading.Event()

    def hung_upload(session_id: str) -> dict[str, Any]:
        release.wait(seconds(10))
        return {}

    archive = SessionArchive(settings)
    archive.upload = hung_upload  # type: ignore[method-assign]
    archive.start()
    archive.enqueue(sid(1))
    started = time.monotonic()
    archive.stop(timeout=0.3)
    assert time.monotonic() - started < 2
    release.set()
    assert logged(caplog, logging.WARNING, "archive: uploads still running after 0.3 s at shutdown")
    assert not (settings.audio_storage_dir / sid(1) / "uploaded.json").exists()


def test_s3_without_boto3_is_a_clear_startup_error(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3_BUCKET with boto3 missing stops create_app with a message that says what to install."""
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(ArchiveUnavailableError, match=r"S3_BUCKET is set but boto3 is not installed.*\.\[s3\]"):
        create_app(make_settings(s3_bucket="recordings"))


# -- GET /sessions/{id} and /sessions/{id}/audio -------------------------------------------------


def test_session_record_has_metadata_and_transcript(client: TestClient, settings: Settings) -> None:
    """The body is session.json plus `transcript`: the finals the client received, in order."""
    session_id, messages = stream_speech(client)
    response = client.get(f"/sessions/{session_id}")
    assert response.status_code == 200
    body = response.json()
    metadata = json.loads((settings.audio_storage_dir / session_id / "session.json").read_text())
    expected = [{k: v for k, v in m.items() if k not in ("type", "is_final", "lag")} for m in finals(messages)]
    assert expected and body == {**metadata, "transcript": expected}
    assert body["status"] == "completed" and body["sha256"] == messages[-1]["recording"]["sha256"]


def test_session_audio_is_the_stored_file(client: TestClient, settings: Settings) -> None:
    """GET …/audio returns audio.wav byte for byte, as audio/wav, and honours a Range request."""
    session_id, _ = stream_speech(client, seed=7, duration_s=1.0)
    stored = (settings.audio_storage_dir / session_id / "audio.wav").read_bytes()
    whole = client.get(f"/sessions/{session_id}/audio")
    assert whole.status_code == 200
    assert whole.headers["content-type"] == "audio/wav"
    assert whole.headers["accept-ranges"] == "bytes"
    assert whole.content == stored
    part = client.get(f"/sessions/{session_id}/audio", headers={"Range": "bytes=44-143"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 44-143/{len(stored)}"
    assert part.content == stored[44:144]
    tail = client.get(f"/sessions/{session_id}/audio", headers={"Range": "bytes=-10"})
    assert (tail.status_code, tail.content) == (206, stored[-10:])


@pytest.mark.parametrize(
    ("suffix", "media_type"),
    [
        (".wav", "audio/wav"),
        (".webm", "audio/webm"),
        (".ogg", "audio/ogg"),
        (".mp4", "audio/mp4"),
        (".mp3", "audio/mpeg"),
        (".flac", "audio/flac"),
    ],
)
def test_audio_media_type_follows_the_container(
    client: TestClient, settings: Settings, suffix: str, media_type: str
) -> None:
    """Each stored container is served with its own media type."""
    folder = make_record(settings.audio_storage_dir, sid(9), suffix=suffix, audio_bytes=300)
    response = client.get(f"/sessions/{sid(9)}/audio")
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type
    assert response.content == (folder / f"audio{suffix}").read_bytes()


def test_session_routes_need_a_token_when_tokens_are_set(make_settings: Callable[..., Settings]) -> None:
    """401 without or with a wrong token; a Bearer header or ?token= opens both routes (of a record
    made before tokens were set, which has no owner)."""
    settings = make_settings(api_tokens="secret-1,secret-2")
    make_record(settings.audio_storage_dir, sid(1))
    with TestClient(create_app(settings)) as client:
        for path in (f"/sessions/{sid(1)}", f"/sessions/{sid(1)}/audio"):
            missing = client.get(path)
            assert missing.status_code == 401
            assert missing.headers["www-authenticate"] == "Bearer"
            assert missing.json()["detail"]["code"] == "unauthorized"
            assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert client.get(path, headers={"Authorization": "Bearer secret-2"}).status_code == 200
            assert client.get(path, params={"token": "secret-1"}).status_code == 200


def test_unknown_and_malformed_ids_are_404(client: TestClient, settings: Settings) -> None:
    """Unknown ids, ids that are not 32 lowercase hex characters, and traversal attempts get 404."""
    unknown = client.get(f"/sessions/{sid(77)}")
    assert unknown.status_code == 404
    assert unknown.json() == {"detail": {"code": "not_found", "message": f"no session {sid(77)}"}}
    assert client.get(f"/sessions/{sid(77)}/audio").json()["detail"]["message"] == f"no session {sid(77)}"
    upper = "0123456789ABCDEF" * 2
    make_record(settings.audio_storage_dir, upper)  # exists on disk, but is not a server-made id
    (settings.audio_storage_dir / "session.json").write_text("{}")  # what `..`-style ids would reach
    for bad in (upper, sid(1)[:31], sid(1) + "0", "g" * 32, "%2e%2e", "..%2F..", "..%2F..%2Fetc"):
        for path in (f"/sessions/{bad}", f"/sessions/{bad}/audio"):
            response = client.get(path)
            assert response.status_code == 404, (path, response.text)
    traversal = client.get("/sessions/%2e%2e/audio")  # reaches the route as the id ".."
    assert traversal.json()["detail"]["message"] == "'..' is not a session id (32 lowercase hexadecimal characters)"
    malformed = client.get("/sessions/ABC")
    assert malformed.json() == {
        "detail": {"code": "not_found", "message": "'ABC' is not a session id (32 lowercase hexadecimal characters)"}
    }


def test_session_without_audio_is_404(client: TestClient, settings: Settings) -> None:
    """A session that ended before any audio has a record but no audio file."""
    folder = make_record(settings.audio_storage_dir, sid(11))
    (folder / "audio.wav").unlink()
    assert client.get(f"/sessions/{sid(11)}").status_code == 200
    response = client.get(f"/sessions/{sid(11)}/audio")
    assert response.status_code == 404
    assert response.json()["detail"]["message"] == f"session {sid(11)} has no audio"


def test_audio_of_a_live_session_is_409(client: TestClient, settings: Settings) -> None:
    """A recording still growing is not served (its length would change mid-response); its record is."""
    make_record(settings.audio_storage_dir, sid(12), status="active", ended=None)
    sessions = client.app.state.server.sessions  # type: ignore[attr-defined]
    sessions[sid(12)] = object()
    try:
        assert client.get(f"/sessions/{sid(12)}").json()["status"] == "active"
        response = client.get(f"/sessions/{sid(12)}/audio")
        assert response.status_code == 409
        assert response.json()["detail"]["code"] == "session_active"
    finally:
        del sessions[sid(12)]
