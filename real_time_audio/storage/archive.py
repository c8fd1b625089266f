"""Archive of finished sessions in S3-compatible storage (on when S3_BUCKET is set).

Each finished session's files go to s3://<bucket>/<S3_PREFIX><session id>/<file name>. Sessions
are handed over by a session-end hook through a bounded queue and uploaded by one background
thread, with a few retries and growing pauses. A finished upload is recorded in the session's
folder as `uploaded.json` (bucket, prefix, keys, sizes, SHA-256s, time); session.json itself is
never touched. At start-up the thread first uploads every finished session that has no such
record, so a failed or interrupted upload is retried then. boto3 is imported only here, and only
when archiving is on.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import queue
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from real_time_audio.config import Settings
from real_time_audio.storage.layout import CONTENT_TYPES, METADATA, UPLOADED
from real_time_audio.storage.retention import scan_sessions

logger = logging.getLogger(__name__)

MARKER = UPLOADED
QUEUE_SIZE = 256


class ArchiveUnavailableError(RuntimeError):
    """Raised at start-up when S3_BUCKET is set but the archive cannot work (boto3 missing, bad endpoint)."""


class SessionNotFinishedError(Exception):
    """The session's record still says "active"; it is not uploaded until it is closed."""


def load_boto3() -> ModuleType:
    """boto3, or a start-up error that says how to install it."""
    try:
        return importlib.import_module("boto3")
    except ImportError as exc:
        raise ArchiveUnavailableError(
            "S3_BUCKET is set but boto3 is not installed; install the s3 extra (pip install -e '.[s3]') "
            "or leave S3_BUCKET empty"
        ) from exc


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class SessionArchive:
    """Uploads finished session records to one bucket, from one background thread."""

    # Pauses between attempts (so len + 1 attempts); tests shorten them.
    RETRY_DELAYS_S: tuple[float, ...] = (1.0, 4.0, 15.0)
    # How long shutdown waits for queued uploads; what is left is uploaded at the next start-up.
    SHUTDOWN_TIMEOUT_S = 20.0

    def __init__(self, settings: Settings) -> None:
        if settings.s3_bucket is None:
            raise ValueError("SessionArchive needs S3_BUCKET")
        self._boto3 = load_boto3()
        self.root = settings.audio_storage_dir
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix
        self.endpoint_url = settings.s3_endpoint_url
        self.region = settings.s3_region
        self._queue: queue.Queue[str | None] = queue.Queue(QUEUE_SIZE)
        self._closing = threading.Event()  # shutdown began: queued work is finished, the start-up backlog is not
        self._abandon = threading.Event()  # shutdown timed out: stop as soon as possible
        self._thread: threading.Thread | None = None
        self._client: Any = None

    @classmethod
    def from_settings(cls, settings: Settings) -> SessionArchive | None:
        """The archive when S3_BUCKET is set, else None."""
        return cls(settings) if settings.s3_bucket else None

    # -- lifecycle (called from the lifespan through asyncio.to_thread) --------------------------

    def start(self) -> None:
        """Create the S3 client (no network yet) and start the upload thread."""
        from botocore.config import Config

        try:
            self._client = self._boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                # Our own retries (with longer pauses) come on top of one quick retry by botocore.
                config=Config(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=10, read_timeout=60),
            )
        except Exception as exc:  # botocore reports a bad endpoint or region with several exception types
            raise ArchiveUnavailableError(f"cannot set up the S3 client for bucket {self.bucket!r}: {exc}") from exc
        self._closing.clear()
        self._abandon.clear()
        self._thread = threading.Thread(target=self._run, name="s3-archive", daemon=True)
        self._thread.start()
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        logger.info("archive: finished sessions go to s3://%s/%s%s", self.bucket, self.prefix, where)

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued uploads, waiting at most `timeout` seconds, then stop the thread."""
        if self._thread is None:
            return
        timeout = self.SHUTDOWN_TIMEOUT_S if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._closing.set()
        with contextlib.suppress(queue.Full):  # a full queue: the thread is busy until the deadline anyway
            self._queue.put(None, timeout=timeout)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._abandon.set()
            logger.warning(
                "archive: uploads still running after %g s at shutdown; %d queued sessions are left for the next "
                "start-up",
                timeout,
                self._queue.qsize(),
            )
        self._thread = None

    def enqueue(self, session_id: str) -> None:
        """Session-end hook: queue the session for upload. Never blocks (it runs on the event loop)."""
        if self._closing.is_set() and self._thread is None:
            logger.info("archive: session %s ended after shutdown; it is uploaded at the next start-up", session_id)
            return
        try:
            self._queue.put_nowait(session_id)
        except queue.Full:
            logger.warning(
                "archive: upload queue full (%d sessions); session %s is uploaded at the next start-up",
                QUEUE_SIZE,
                session_id,
                extra={"session_id": session_id},
            )

    # -- state on disk --------------------------------------------------------------------------

    def is_uploaded(self, folder: Path) -> bool:
        """Whether the session in `folder` has been uploaded to this bucket and prefix."""
        try:
            marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(marker, dict) and marker.get("bucket") == self.bucket and marker.get("prefix") == self.prefix

    def backlog(self) -> list[str]:
        """Finished sessions without a record of their upload, oldest first."""
        stored = [s for s in scan_sessions(self.root) if s.status != "active" and not self.is_uploaded(s.folder)]
        return [s.session_id for s in sorted(stored, key=lambda s: (s.ended, s.session_id))]

    # -- the upload thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            backlog = self.backlog()
        except OSError as exc:
            logger.error("archive: cannot scan %s for sessions not yet uploaded: %s", self.root, exc)
            backlog = []
        if backlog:
            logger.info("archive: %d finished sessions not yet uploaded; uploading them now", len(backlog))
        for session_id in backlog:
            if self._closing.is_set():
                break
            self._archive(session_id)
        while not self._abandon.is_set():
            queued = self._queue.get()
            if queued is None:
                break
            self._archive(queued)

    def _archive(self, session_id: str) -> None:
        """Upload one session, retrying with pauses; a final failure is logged and left for the next start-up."""
        folder = self.root / session_id
        if not folder.is_dir():
            logger.warning("archive: session %s has no folder; nothing to upload", session_id)
            return
        if self.is_uploaded(folder):
            return
        attempts = len(self.RETRY_DELAYS_S) + 1
        for attempt in range(1, attempts + 1):
            try:
                self.upload(session_id)
                return
            except SessionNotFinishedError:
                problem = "its record still says active"
            except Exception as exc:  # botocore raises many types (connection, client, transfer errors)
                problem = f"{type(exc).__name__}: {exc}"
            if attempt == attempts:
                break
            delay = self.RETRY_DELAYS_S[attempt - 1]
            logger.warning(
                "archive: upload of session %s failed (attempt %d of %d: %s); retrying in %g s",
                session_id,
                attempt,
                attempts,
                problem,
                delay,
                extra={"session_id": session_id},
            )
            if self._abandon.wait(delay):
                break
        logger.error(
            "archive: upload of session %s failed after %d attempts (%s); it is retried at the next start-up",
            session_id,
            attempt,
            problem,
            extra={"session_id": session_id},
        )

    def upload(self, session_id: str) -> dict[str, Any]:
        """Upload every file of one finished session (session.json last), then write its marker. Blocks."""
        folder = self.root / session_id
        metadata = json.loads((folder / METADATA).read_text(encoding="utf-8"))
        if metadata.get("status") == "active":
            raise SessionNotFinishedError(session_id)
        files = sorted(
            (p for p in folder.iterdir() if p.is_file() and p.name != MARKER and not p.name.endswith(".tmp")),
            key=lambda p: (p.name == METADATA, p.name),  # session.json in the bucket means complete
        )
        started = time.monotonic()
        objects: list[dict[str, Any]] = []
        for path in files:
            key = f"{self.prefix}{session_id}/{path.name}"
            digest = file_sha256(path)
            extra: dict[str, Any] = {"Metadata": {"sha256": digest}}
            if path.suffix in CONTENT_TYPES:
                extra["ContentType"] = CONTENT_TYPES[path.suffix]
            self._client.upload_file(str(path), self.bucket, key, ExtraArgs=extra)
            objects.append({"file": path.name, "key": key, "bytes": path.stat().st_size, "sha256": digest})
        marker = {
            "bucket": self.bucket,
            "prefix": self.prefix,
            "endpoint_url": self.endpoint_url,
            "uploaded_at": _now_iso(),
            "objects": objects,
        }
        tmp = folder / (MARKER + ".tmp")
        tmp.write_text(json.dumps(marker, indent=2), encoding="utf-8")
        os.replace(tmp, folder / MARKER)
        logger.info(
            "archive: uploaded session %s to s3://%s/%s%s/ (%d files, %d bytes, %.1f s)",
            session_id,
            self.bucket,
            self.prefix,
            session_id,
            len(objects),
            sum(o["bytes"] for o in objects),
            time.monotonic() - started,
            extra={"session_id": session_id},
        )
        return marker
