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
from real_time_audio.audio.vad import FrameScorer, SileroScorer
from real_time_audio.config import Settings, load_settings
from real_time_audio.ops.drain import install_signal_handlers
from real_time_audio.ops.logs import configure_logging
from real_time_audio.ops.metrics import LiveState, Metrics
from real_time_audio.ops.security import ConnectionCounter
from real_time_audio.routes import STATIC_DIR, router
from real_time_audio.service import TranscriptionEngine
from real_time_audio.storage.archive import SessionArchive
from real_time_audio.storage.recorder import recover_interrupted
from real_time_audio.storage.retention import RetentionPolicy, retention_loop
from real_time_audio.whisper.backend import load_engine

logger = logging.getLogger("real_time_audio")
SHUTDOWN_RELEASE_S = 10.0  # how long shutdown waits for sessions to close their records


def create_app(
    settings: Settings | None = None,
    engine_factory: Callable[[Settings], TranscriptionEngine] = load_engine,
    vad_factory: Callable[[], FrameScorer] = SileroScorer.shared,
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
        app.state.engine = engine
        if settings.vad != "off":
            app.state.vad_scorer = await asyncio.to_thread(vad_factory)
        engine.on_batch = metrics.observe_batch
        await asyncio.to_thread(engine.start)
        configure_logging(settings.log_level, settings.log_format)  # the server's loggers exist by now
        install_signal_handlers(app, settings.drain_timeout_s)
        logger.info(
            "ready: %s on %s, storage in %s", engine.model_id, engine.device, settings.audio_storage_dir.resolve()
        )
        try:
            async with storage_lifecycle(app, archive):
                yield
        finally:
            await sessions_released(app, SHUTDOWN_RELEASE_S)
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
    app.state.settings = settings
    app.state.engine = None
    app.state.vad_scorer = None
    app.state.sessions = {}
    app.state.releasing = set()  # sessions' final releases (record closed, decoder stopped) still running
    app.state.echo_active = 0  # /ws/echo loops (count toward MAX_SESSIONS too)
    app.state.rest_active = 0  # POST /v1/audio/transcriptions requests in progress (count toward MAX_SESSIONS)
    app.state.draining = False  # set on SIGTERM: new sessions are refused while open ones finish
    # Called with the session id once a session's record is closed (e.g. to upload it); must not block.
    app.state.session_end_hooks = []
    app.state.archive = archive
    if archive is not None:
        app.state.session_end_hooks.append(archive.enqueue)
    app.state.connections = ConnectionCounter(settings.max_connections_per_client)
    app.state.metrics = metrics
    metrics.watch(live_state(app))
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


async def sessions_released(app: FastAPI, timeout_s: float) -> None:
    """At shutdown: wait (bounded) until every session has ended and its record is closed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while app.state.sessions or app.state.releasing:
        if loop.time() >= deadline:
            logger.warning("shutdown: %d session(s) still open", len(app.state.sessions) + len(app.state.releasing))
            return
        await asyncio.sleep(0.02)


@asynccontextmanager
async def storage_lifecycle(app: FastAPI, archive: SessionArchive | None) -> AsyncIterator[None]:
    """Uploads of finished sessions (S3_BUCKET) and the retention sweep, while the server runs."""
    settings: Settings = app.state.settings
    if archive is not None:
        await asyncio.to_thread(archive.start)
    sweeper: asyncio.Task[None] | None = None
    if RetentionPolicy.from_settings(settings).enabled:
        sweeper = asyncio.create_task(
            retention_loop(settings, lambda: set(app.state.sessions), archive.is_uploaded if archive else None),
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


def live_state(app: FastAPI) -> LiveState:
    """What /metrics reads from the running app at each scrape."""

    def engine() -> TranscriptionEngine | None:
        return app.state.engine  # type: ignore[no-any-return]

    def worst_lag() -> float:
        return max((session.lag for session in app.state.sessions.values()), default=0.0)

    return LiveState(
        sessions=lambda: len(app.state.sessions),
        rest_requests=lambda: app.state.rest_active,
        echo_sessions=lambda: app.state.echo_active,
        queue_depth=lambda: e.queue_depth() if (e := engine()) else (0, 0),
        worst_lag=worst_lag,
        partials_skipped=lambda: e.stats.partials_skipped if (e := engine()) else 0,
        ready=lambda: bool((e := engine()) and e.ready),
        draining=lambda: app.state.draining,
        model=lambda: (e.model_id, e.device, e.dtype, e.requested_model) if (e := engine()) else ("", "", "", ""),
    )


app = create_app()


if __name__ == "__main__":
    import uvicorn

    settings = app.state.settings
    from real_time_audio.ops.server import server_options

    uvicorn.run(
        "main:app",
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        **server_options(settings),
    )
