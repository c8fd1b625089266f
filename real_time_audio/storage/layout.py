"""The session folder: the one place that knows how a session's record is laid out on disk.

Under AUDIO_STORAGE_DIR, one folder per session, named by its server-generated id (32 lowercase
hexadecimal characters, so no client-chosen name ever becomes a path):

    audio.wav          raw PCM exactly as received, behind a WAV header kept valid as it grows, or
    audio.<container>  a container stream (webm, ogg, mp4, mp3, flac, wav) byte for byte as received
    transcript.jsonl   one JSON line per final transcription
    session.json       effective config, model, device, times, byte count, SHA-256, status
    uploaded.json      written once the S3 archive holds the session (S3_BUCKET)

The recorder writes these files; the records API, retention and the archive read them through here.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from pathlib import Path
from typing import Any

from real_time_audio.audio.pcm import SAMPLE_WIDTH

logger = logging.getLogger(__name__)

SESSION_ID = re.compile(r"[0-9a-f]{32}")
METADATA = "session.json"
TRANSCRIPT = "transcript.jsonl"
UPLOADED = "uploaded.json"
# Content type of every file a session record may hold, by suffix (also used to serve the audio).
CONTENT_TYPES = {
    ".wav": "audio/wav",
    ".webm": "audio/webm",
    ".ogg": "audio/ogg",
    ".mp4": "audio/mp4",
    ".mp3": "audio/mpeg",
    ".flac": "audio/flac",
    ".json": "application/json",
    ".jsonl": "application/x-ndjson",
}
AUDIO_NAMES = frozenset(f"audio{suffix}" for suffix, kind in CONTENT_TYPES.items() if kind.startswith("audio/"))


def new_session_id() -> str:
    return uuid.uuid4().hex


def is_session_id(name: str) -> bool:
    return SESSION_ID.fullmatch(name) is not None


def audio_name(encoding: str) -> str:
    """The audio file's name for a session's encoding: raw PCM is kept as WAV."""
    return "audio.wav" if encoding in SAMPLE_WIDTH else f"audio.{encoding}"


def read_metadata(folder: Path) -> dict[str, Any] | None:
    """session.json of the session in `folder`, or None when there is no such session."""
    try:
        metadata = json.loads((folder / METADATA).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError:
        logger.warning("session %s: %s is not valid JSON", folder.name, METADATA)
        return None
    return metadata if isinstance(metadata, dict) else None


def read_transcript(folder: Path) -> list[dict[str, Any]]:
    """The finals in transcript.jsonl; a line cut short by a crash is skipped."""
    try:
        lines = (folder / TRANSCRIPT).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    finals = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            finals.append(json.loads(line))
        except ValueError:
            logger.warning("session %s: transcript line %d is not JSON; skipped", folder.name, number)
    return finals


def audio_path(folder: Path, metadata: dict[str, Any]) -> Path | None:
    """The session's audio file, if it has one. Only the names the recorder writes are accepted."""
    name = metadata.get("audio_file")
    if not isinstance(name, str) or name not in AUDIO_NAMES:
        return None
    path = folder / name
    return path if path.is_file() else None
