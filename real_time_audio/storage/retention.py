"""Storage retention: deletes finished session records by age, then by the storage folder's size.

A sweep looks only at folders named like a session id (32 lowercase hex characters) that hold a
readable session.json; every other file or folder is left alone (it still counts toward the size).
A session is never deleted while it is live, while its session.json says "active", or, when S3
archiving is on, before its upload has been recorded. The sweep blocks; `retention_loop` runs it
in a worker thread at start-up and then every RETENTION_INTERVAL_S.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from real_time_audio.config import Settings
from real_time_audio.storage.layout import METADATA, is_session_id

logger = logging.getLogger(__name__)

BYTES_PER_GB = 1_000_000_000


@dataclass(slots=True)
class RetentionPolicy:
    """What a sweep may delete: sessions older than `max_age_s`, then the oldest while over `max_bytes`."""

    max_age_s: float | None = None
    max_bytes: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        return cls(
            max_age_s=settings.retention_days * 86400 if settings.retention_days > 0 else None,
            max_bytes=int(settings.retention_max_gb * BYTES_PER_GB) if settings.retention_max_gb > 0 else None,
        )

    @property
    def enabled(self) -> bool:
        return self.max_age_s is not None or self.max_bytes is not None


@dataclass(slots=True)
class StoredSession:
    """One session folder as the sweep sees it."""

    session_id: str
    folder: Path
    status: str
    ended: float  # epoch seconds: ended_at from session.json, else the folder's mtime
    size: int


@dataclass(slots=True)
class SweepResult:
    """What one sweep did; `protected` counts the sessions it was not allowed to delete."""

    deleted_by_age: list[str] = field(default_factory=list)
    deleted_by_size: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    total_bytes: int = 0  # size of the storage folder after the sweep
    kept: int = 0
    protected: int = 0

    @property
    def deleted(self) -> list[str]:
        return self.deleted_by_age + self.deleted_by_size


def tree_size(path: Path) -> int:
    """Bytes in the regular files under `path` (symlinks are not followed); vanished files count 0."""
    total = 0
    for directory, _, names in os.walk(path):
        for name in names:
            try:
                stat = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            total += stat.st_size
    return total


def _ended_at(metadata: dict[str, object], folder: Path) -> float:
    value = metadata.get("ended_at")
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            pass
    return folder.stat().st_mtime


def scan_sessions(root: Path) -> list[StoredSession]:
    """The session folders under `root` with a readable session.json, in no particular order."""
    found: list[StoredSession] = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return found
    for entry in entries:
        if not is_session_id(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        folder = Path(entry.path)
        try:
            metadata = json.loads((folder / METADATA).read_text(encoding="utf-8"))
            if not isinstance(metadata, dict):
                continue
            ended = _ended_at(metadata, folder)
        except (OSError, ValueError):
            # Not yet written (a session starting right now) or damaged: not ours to judge.
            continue
        status = metadata.get("status")
        found.append(
            StoredSession(
                entry.name, folder, status if isinstance(status, str) else "unknown", ended, tree_size(folder)
            )
        )
    return found


def sweep(
    root: Path,
    policy: RetentionPolicy,
    live: Collection[str] = (),
    uploaded: Callable[[Path], bool] | None = None,
    now: float | None = None,
) -> SweepResult:
    """Delete what `policy` allows under `root`, logging each deletion and a summary.

    `live` holds the ids of sessions in progress; `uploaded`, when archiving is on, says whether a
    session folder's upload has been recorded (a session not yet uploaded is kept).
    """
    now = time.time() if now is None else now
    result = SweepResult()
    total = tree_size(root)
    candidates: list[StoredSession] = []
    for stored in scan_sessions(root):
        protected = stored.session_id in live or stored.status == "active"
        if not protected and uploaded is not None:
            protected = not uploaded(stored.folder)
        if protected:
            result.protected += 1
        else:
            candidates.append(stored)
    candidates.sort(key=lambda s: (s.ended, s.session_id))  # oldest first

    survivors: list[StoredSession] = []
    for stored in candidates:
        expired = policy.max_age_s is not None and now - stored.ended > policy.max_age_s
        if expired and _delete(stored, "older than the retention period"):
            result.deleted_by_age.append(stored.session_id)
            result.freed_bytes += stored.size
            total -= stored.size
        else:
            survivors.append(stored)
    if policy.max_bytes is not None:
        for stored in list(survivors):
            if total <= policy.max_bytes:
                break
            if _delete(stored, "storage over its size limit"):
                result.deleted_by_size.append(stored.session_id)
                result.freed_bytes += stored.size
                total -= stored.size
                survivors.remove(stored)
    result.total_bytes = total
    result.kept = len(survivors)
    _log_summary(result, policy)
    return result


def _delete(stored: StoredSession, reason: str) -> bool:
    try:
        shutil.rmtree(stored.folder)
    except OSError as exc:
        logger.warning("retention: could not delete session %s: %s", stored.session_id, exc)
        return False
    ended = datetime.fromtimestamp(stored.ended).astimezone().isoformat(timespec="seconds")
    logger.info(
        "retention: deleted session %s (%s, %s, ended %s, %d bytes)",
        stored.session_id,
        reason,
        stored.status,
        ended,
        stored.size,
        extra={"session_id": stored.session_id},
    )
    return True


def _log_summary(result: SweepResult, policy: RetentionPolicy) -> None:
    logger.info(
        "retention sweep: deleted %d sessions (%d by age, %d by size), freed %d bytes; %d bytes in storage, "
        "%d finished sessions kept, %d protected (live, active or not yet uploaded)",
        len(result.deleted),
        len(result.deleted_by_age),
        len(result.deleted_by_size),
        result.freed_bytes,
        result.total_bytes,
        result.kept,
        result.protected,
    )
    if policy.max_bytes is not None and result.total_bytes > policy.max_bytes:
        logger.warning(
            "retention: storage holds %d bytes, over the limit of %d; the rest is live, active, not yet uploaded "
            "or not session records",
            result.total_bytes,
            policy.max_bytes,
        )


async def retention_loop(
    settings: Settings,
    live: Callable[[], Collection[str]],
    uploaded: Callable[[Path], bool] | None = None,
) -> None:
    """Sweep now and then every RETENTION_INTERVAL_S until cancelled; a failed sweep is logged and retried."""
    policy = RetentionPolicy.from_settings(settings)
    while True:
        try:
            # The live ids are read on the event loop; a session that starts later is still "active" on disk.
            await asyncio.to_thread(sweep, settings.audio_storage_dir, policy, set(live()), uploaded)
        except Exception:
            logger.exception("retention sweep failed; next try in %g s", settings.retention_interval_s)
        await asyncio.sleep(settings.retention_interval_s)
