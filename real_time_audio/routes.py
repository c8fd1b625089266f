"""HTTP and WebSocket routes. Thin: admission checks, then the session does the work."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from real_time_audio.api.echo import EchoSession
from real_time_audio.handler import CLOSE_INTERNAL, Session
from real_time_audio.messages import ErrorMessage, to_json
from real_time_audio.ops.metrics import Metrics
from real_time_audio.ops.security import (
    ConnectionCounter,
    active_sessions,
    check_access,
    chosen_subprotocol,
    client_address,
)
from real_time_audio.service import TranscriptionEngine

logger = logging.getLogger(__name__)
router = APIRouter()

CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN_LATER = 1013


STATIC_DIR = Path(__file__).parent / "static"


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    """The browser page: microphone capture and live text (static files, no build step)."""
    return FileResponse(STATIC_DIR / "index.html")


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process is up and serving HTTP."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 once the model is loaded and warmed up; 503 before that, while draining, or if the engine died."""
    engine: TranscriptionEngine | None = getattr(request.app.state, "engine", None)
    if request.app.state.draining:  # load balancers stop sending new clients here
        return JSONResponse({"status": "unavailable", "reason": "shutting down"}, status_code=503)
    if engine is None or not engine.ready:
        reason = engine.dead_reason if engine and engine.dead_reason else "model not loaded"
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
    body: dict[str, Any] = {
        "status": "ready",
        "model": engine.model_id,
        "device": engine.device,
        "sessions": len(request.app.state.sessions),
    }
    if engine.fallback_reason is not None:  # say plainly that another model serves than the one configured
        body["requested_model"] = engine.requested_model
        body["fallback_reason"] = engine.fallback_reason
    return JSONResponse(body)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (text exposition format)."""
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)


@router.websocket("/ws/transcribe")
async def transcribe(websocket: WebSocket) -> None:
    """Live transcription; the wire protocol is described in docs/protocol.md."""
    app = websocket.app
    engine: TranscriptionEngine = app.state.engine
    sessions: dict[str, Session] = app.state.sessions
    settings = app.state.settings
    await _accept(websocket)
    if not await _admit(websocket):
        return
    if not engine.ready:
        await _refuse(websocket, "internal", "the transcription engine is not available", CLOSE_INTERNAL)
        return
    if not await _has_room(websocket):
        return
    session = Session(
        websocket,
        engine,
        settings,
        dict(websocket.query_params),
        app.state.vad_scorer,
        app.state.metrics,
        app.state.releasing,
    )
    sessions[session.id] = session
    slot = app.state.connections.acquire(client_address(websocket))

    def leave() -> None:  # idempotent: before the server's close frame, and at the end anyway
        sessions.pop(session.id, None)
        slot.release()

    session.before_close = leave
    try:
        await session.run()
    finally:
        leave()
        for hook in app.state.session_end_hooks:
            hook(session.id)


@router.websocket("/ws/echo")
async def echo(websocket: WebSocket) -> None:
    """Sends received audio back after a delay (default ECHO_DELAY_S), to test a microphone loop."""
    app = websocket.app
    await _accept(websocket)
    if not await _admit(websocket) or not await _has_room(websocket):
        return
    settings = app.state.settings
    app.state.echo_active += 1
    try:
        with app.state.connections.hold(client_address(websocket)):
            await EchoSession(websocket, settings).run()
    finally:
        app.state.echo_active -= 1


async def _accept(websocket: WebSocket) -> None:
    """Accept the handshake, selecting `rta.v1` if the client offered subprotocols (a browser that
    sends its token as one fails the connection unless the server selects one it offered)."""
    await websocket.accept(subprotocol=chosen_subprotocol(websocket.scope.get("subprotocols") or ()))


async def _admit(websocket: WebSocket) -> bool:
    """The checks every WebSocket passes first: origin, token, shutdown, connections per address.

    The connection is already accepted, so that a refused client reads why in an `error` message.
    """
    app = websocket.app
    refusal = check_access(app.state.settings, websocket)
    if refusal is not None:
        code, message = refusal
        await _refuse(websocket, code, message, CLOSE_POLICY)
        return False
    if app.state.draining:
        await _refuse(websocket, "server_busy", "the server is shutting down; try again shortly", CLOSE_TRY_AGAIN_LATER)
        return False
    address = client_address(websocket)
    connections: ConnectionCounter = app.state.connections
    if connections.full(address):
        await _refuse(
            websocket,
            "server_busy",
            f"too many connections from {address}: the limit is {connections.limit} at a time",
            CLOSE_TRY_AGAIN_LATER,
        )
        return False
    return True


async def _has_room(websocket: WebSocket) -> bool:
    """Below MAX_SESSIONS (transcriptions, uploads and echo loops together), or refused with 1013."""
    state = websocket.app.state
    limit = state.settings.max_sessions
    if active_sessions(state) < limit:
        return True
    message = f"the server is at its limit of {limit} sessions; try again later"
    await _refuse(websocket, "server_busy", message, CLOSE_TRY_AGAIN_LATER)
    return False


async def _refuse(websocket: WebSocket, code: Any, message: str, close_code: int) -> None:
    logger.info("refused connection from %s: %s: %s", client_address(websocket), code, message)
    metrics: Metrics | None = websocket.app.state.metrics
    if metrics is not None:
        metrics.error(code)
    try:
        await websocket.send_text(to_json(ErrorMessage(code=code, message=message)))
        await websocket.close(close_code)
    except (RuntimeError, OSError):
        pass
