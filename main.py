"""Composition root: `app` is what `uvicorn main:app` and `gunicorn main:app` serve.

Importing this module only reads the settings; the model is loaded by the lifespan, in each
server process, so nothing touches CUDA before gunicorn forks its workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from real_time_audio.api.records import router as records_router
from real_time_audio.api.rest import router as rest_router
from real_time_audio.audio.vad import BatchingScorer, FrameScorer
from real_time_audio.config import Settings, load_settings
from real_time_audio.ops.drain import install_signal_handlers
from real_time_audio.ops.logs import configure_logging
from real_time_audio.ops.metrics import LiveState, Metrics
from real_time_audio.routes import STATIC_DIR, router
from real_time_audio.service import TranscriptionEngine
from real_time_audio.state import ServerState
from real_time_audio.storage.archive import SessionArchive
from real_time_audio.storage.recorder import recover_interrupted
from real_time_audio.storage.retention import RetentionPolicy, retention_loop
from real_time_audio.whisper.backend import load_engine

logger = logging.getLogger("real_time_audio")
SHUTDOWN_RELEASE_S = 10.0  # how long shutdown waits for sessions to close their records


def create_app(
    settings: Settings | None = None,
    engine_factory: Callable[[Settings], TranscriptionEngine] = load_engine,
    vad_factory: Callable[[], FrameScorer] = BatchingScorer.shared,
) -> FastAPI:
    """Build the application. The engine and the VAD model are loaded by the lifespan, not here."""
    settings = settings or load_settings()
    configure_logging(settings.log_level, settings.log_format)
    metrics = Metrics()
    archive = SessionArchive.from_settings(settings)  # None without S3_BUCKET; fails now if boto3 is missing

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.audio_storage_dir.mkdir(parents=True, exist_ok=True)
        # Records left "active" by a process that died (a crash, kill -9) become "interrupted".
        for session_id in await asyncio.to_thread(recover_interrupted, settings.audio_storage_dir):
            logger.warning("session %s was interrupted by a server crash; its record was repaired", session_id)
        engine = engine_factory(settings)
        state.engine = engine
        if settings.vad != "off":
            state.vad_scorer = await asyncio.to_thread(vad_factory)
        engine.on_batch = metrics.observe_batch
        await asyncio.to_thread(engine.start)
        if settings.max_sessions == "auto":
            interval_s = settings.partial_interval_ms / 1000
            capacity = await asyncio.to_thread(engine.measure_capacity, interval_s, settings.queue_max_size)
            logger.info(
                "MAX_SESSIONS=auto: %d sessions (%d windows of %g s in %.2f s per model call, a decode per "
                "session every %g s)",
                capacity.sessions,
                capacity.batch,
                capacity.window_s,
                capacity.call_seconds,
                capacity.interval_s,
            )
        configure_logging(settings.log_level, settings.log_format)  # the server's loggers exist by now
        install_signal_handlers(state, settings.drain_timeout_s)
        logger.info(
            "ready: %s on %s, storage in %s", engine.model_id, engine.device, settings.audio_storage_dir.resolve()
        )
        try:
            async with storage_lifecycle(state):
                yield
        finally:
            await sessions_released(state, SHUTDOWN_RELEASE_S)
            await asyncio.to_thread(engine.stop)
            logger.info("engine stopped")

    docs = settings.api_docs
    app = FastAPI(
        title="Real-time audio transcription",
        version="1.0.0",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    state = ServerState.create(settings, metrics, archive)
    app.state.server = state  # what the routes reach through the `State` dependency
    metrics.watch(live_state(state))
    if settings.allowed_origins:  # browsers may call the HTTP API only from the allowed origins
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["X-Session-Id"],
        )
    app.include_router(router)
    app.include_router(rest_router)  # POST /v1/audio/transcriptions
    app.include_router(records_router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


async def sessions_released(state: ServerState, timeout_s: float) -> None:
    """At shutdown: wait (bounded) until every session has ended and its record is closed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while state.sessions or state.releasing:
        if loop.time() >= deadline:
            logger.warning("shutdown: %d session(s) still open", len(state.sessions) + len(state.releasing))
            return
        await asyncio.sleep(0.02)


@asynccontextmanager
async def storage_lifecycle(state: ServerState) -> AsyncIterator[None]:
    """Uploads of finished sessions (S3_BUCKET) and the retention sweep, while the server runs."""
    settings, archive = state.settings, state.archive
    if archive is not None:
        await asyncio.to_thread(archive.start)
    sweeper: asyncio.Task[None] | None = None
    if RetentionPolicy.from_settings(settings).enabled:
        sweeper = asyncio.create_task(
            retention_loop(settings, lambda: set(state.sessions), archive.is_uploaded if archive else None),
            name="retention",
        )
    try:
        yield
    finally:
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        if archive is not None:
            await asyncio.to_thread(archive.stop)  # finishes the queued uploads, within its timeout


def live_state(state: ServerState) -> LiveState:
    """What /metrics reads from the running app at each scrape."""

    def engine() -> TranscriptionEngine | None:
        return state.engine

    return LiveState(
        sessions=lambda: len(state.sessions),
        rest_requests=lambda: state.rest_active,
        echo_sessions=lambda: state.echo_active,
        queue_depth=lambda: e.queue_depth() if (e := engine()) else (0, 0),
        worst_lag=state.worst_lag,
        partials_skipped=lambda: e.stats.partials_skipped if (e := engine()) else 0,
        ready=lambda: bool((e := engine()) and e.ready),
        draining=lambda: state.draining,
        model=lambda: (e.model_id, e.device, e.dtype, e.requested_model) if (e := engine()) else ("", "", "", ""),
        max_sessions=lambda: state.session_limit,
        active=lambda: state.active_sessions,
        accepting=lambda: state.unready() is None,
    )


app = create_app()


if __name__ == "__main__":
    import uvicorn

    settings = app.state.server.settings
    from real_time_audio.ops.server import server_options

    uvicorn.run(
        "main:app",
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        **server_options(settings),
    )
