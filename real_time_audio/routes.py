"""HTTP and WebSocket routes. Thin: admission checks, then the session does the work."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette import status

from real_time_audio.api.echo import EchoSession
from real_time_audio.handler import Session
from real_time_audio.messages import ErrorMessage, to_json
from real_time_audio.ops.security import check_access, chosen_subprotocol, client_address
from real_time_audio.state import Refusal, ServerState, State

logger = logging.getLogger(__name__)
router = APIRouter()


STATIC_DIR = Path(__file__).parent / "static"


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    """The browser page: microphone capture and live text (static files, no build step)."""
    return FileResponse(STATIC_DIR / "index.html")


@router.get("/health")
async def health(state: State) -> JSONResponse:
    """Liveness: 200 while the process serves HTTP (the model may still be loading); 503 once the
    engine has died (a CUDA failure, say), which only a restart cures."""
    engine = state.engine
    if engine is not None and engine.dead_reason:
        return JSONResponse({"status": "dead", "reason": engine.dead_reason}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(state: State) -> JSONResponse:
    """Readiness: 200 while new sessions are welcome here; 503 with the reason before the model is
    ready, while draining, if the engine died, or while every session slot is taken."""
    engine = state.engine
    reason = state.unready()
    if reason is not None or engine is None:
        refusal: dict[str, Any] = {"status": "unavailable", "reason": reason or "model not loaded"}
        if engine is not None and engine.ready:  # full or draining: say how full
            refusal |= {"sessions": len(state.sessions), "max_sessions": state.session_limit}
        return JSONResponse(refusal, status_code=503)
    body: dict[str, Any] = {
        "status": "ready",
        "model": engine.model_id,
        "device": engine.device,
        "sessions": len(state.sessions),
        "max_sessions": state.session_limit,
    }
    if engine.capacity is not None:  # MAX_SESSIONS=auto: what it was measured on
        body["capacity"] = dataclasses.asdict(engine.capacity)
    if engine.fallback_reason is not None:  # say plainly that another model serves than the one configured
        body["requested_model"] = engine.requested_model
        body["fallback_reason"] = engine.fallback_reason
    return JSONResponse(body)


@router.get("/metrics", include_in_schema=False)
async def metrics(state: State) -> Response:
    """Prometheus metrics (text exposition format)."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.websocket("/ws/transcribe")
async def transcribe(websocket: WebSocket, state: State) -> None:
    """Live transcription; the wire protocol is described in docs/protocol.md."""
    await _accept(websocket)
    if not await _admit(websocket, state) or not await _refused(websocket, state, state.refuse_engine()):
        return
    if not await _refused(websocket, state, state.refuse_capacity()):
        return
    settings, sessions = state.settings, state.sessions
    session = Session(
        websocket,
        state.serving_engine(),
        settings,
        dict(websocket.query_params),
        state.vad_scorer,
        state.metrics,
        state.releasing,
    )
    sessions[session.id] = session
    slot = state.connections.acquire(client_address(websocket))

    def leave() -> None:  # idempotent: before the server's close frame, and at the end anyway
        sessions.pop(session.id, None)
        slot.release()

    session.before_close = leave
    try:
        await session.run()
    finally:
        leave()
        state.session_ended(session.id)


@router.websocket("/ws/echo")
async def echo(websocket: WebSocket, state: State) -> None:
    """Sends received audio back after a delay (default ECHO_DELAY_S), to test a microphone loop."""
    await _accept(websocket)
    if not await _admit(websocket, state) or not await _refused(websocket, state, state.refuse_capacity()):
        return
    state.echo_active += 1
    try:
        with state.connections.hold(client_address(websocket)):
            await EchoSession(websocket, state.settings).run()
    finally:
        state.echo_active -= 1


async def _accept(websocket: WebSocket) -> None:
    """Accept the handshake, selecting `rta.v1` if the client offered subprotocols (a browser that
    sends its token as one fails the connection unless the server selects one it offered)."""
    await websocket.accept(subprotocol=chosen_subprotocol(websocket.scope.get("subprotocols") or ()))


async def _admit(websocket: WebSocket, state: ServerState) -> bool:
    """The checks every WebSocket passes first: origin, token, shutdown, connections per address.

    The connection is already accepted, so that a refused client reads why in an `error` message.
    """
    refusal = check_access(state.settings, websocket)
    if refusal is not None:
        code, message = refusal
        await _refuse(websocket, state, code, message, status.WS_1008_POLICY_VIOLATION)
        return False
    return await _refused(websocket, state, state.refuse_new(client_address(websocket)))


async def _refused(websocket: WebSocket, state: ServerState, refusal: Refusal | None) -> bool:
    """Send the refusal (if any) the WebSocket way; True when there is none. MAX_SESSIONS counts
    transcriptions, uploads and echo loops together."""
    if refusal is None:
        return True
    if refusal.reason == "engine":
        await _refuse(websocket, state, "internal", refusal.message, status.WS_1011_INTERNAL_ERROR)
    elif refusal.reason == "capacity":
        await _refuse(
            websocket, state, "server_busy", f"{refusal.message}; try again later", status.WS_1013_TRY_AGAIN_LATER
        )
    else:
        await _refuse(websocket, state, "server_busy", refusal.message, status.WS_1013_TRY_AGAIN_LATER)
    return False


async def _refuse(websocket: WebSocket, state: ServerState, code: Any, message: str, close_code: int) -> None:
    logger.info("refused connection from %s: %s: %s", client_address(websocket), code, message)
    state.metrics.error(code)
    try:
        await websocket.send_text(to_json(ErrorMessage(code=code, message=message)))
        await websocket.close(close_code)
    except (RuntimeError, OSError):
        pass
