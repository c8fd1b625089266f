"""Read access to stored sessions: GET /sessions/{id} (metadata and transcript) and /sessions/{id}/audio.

Only server-generated ids (32 lowercase hex characters) name a folder, so no request can reach a
path outside the storage folder. Both routes need the same token as the rest of the API, and a
session is readable only with the token that created it (or an admin token): any other gets the
same 404 as a session that does not exist.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse

from real_time_audio.ops.security import may_read, require_access
from real_time_audio.state import ServerState, State
from real_time_audio.storage.layout import CONTENT_TYPES, audio_path, is_session_id, read_metadata, read_transcript

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/sessions", tags=["sessions"], dependencies=[Depends(require_access)])


def _not_found(message: str) -> HTTPException:
    return HTTPException(404, detail={"code": "not_found", "message": message})


def _folder(state: ServerState, session_id: str) -> Path:
    if not is_session_id(session_id):
        raise _not_found(f"{session_id!r} is not a session id (32 lowercase hexadecimal characters)")
    return state.settings.audio_storage_dir / session_id


def read_record(folder: Path) -> dict[str, Any] | None:
    metadata = read_metadata(folder)
    if metadata is None:
        return None
    return {**metadata, "transcript": read_transcript(folder)}


@router.get("/{session_id}")
async def session_record(session_id: str, request: Request, state: State) -> dict[str, Any]:
    """The session's session.json, with `transcript`: its finals in order. Works while it is live too."""
    folder = _folder(state, session_id)
    record = await asyncio.to_thread(read_record, folder)
    if record is None or not may_read(state.settings, request, record):
        raise _not_found(f"no session {session_id}")
    record.pop("owner", None)
    return record


@router.get("/{session_id}/audio", response_class=FileResponse)
async def session_audio(session_id: str, request: Request, state: State) -> FileResponse:
    """The session's audio exactly as stored (WAV for PCM, else the client's container); Range works."""
    folder = _folder(state, session_id)
    metadata = await asyncio.to_thread(read_metadata, folder)
    if metadata is None or not may_read(state.settings, request, metadata):
        raise _not_found(f"no session {session_id}")
    if session_id in state.sessions:
        # The file grows while we send it, which would break the declared length.
        raise HTTPException(
            409,
            detail={"code": "session_active", "message": f"session {session_id} is still recording; try when it ends"},
        )
    path = await asyncio.to_thread(audio_path, folder, metadata)
    if path is None:
        raise _not_found(f"session {session_id} has no audio")
    return FileResponse(
        path,
        media_type=CONTENT_TYPES[path.suffix],
        filename=f"{session_id}{path.suffix}",
        content_disposition_type="inline",
    )
