"""Composition root: `app` is what `uvicorn main:app` and `gunicorn main:app` serve.

Importing this module only reads the settings; the model is loaded by the lifespan, in each
server process, so nothing touches CUDA before gunicorn forks its workers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from real_time_audio.config import Settings, load_settings
from real_time_audio.routes import STATIC_DIR, router
from real_time_audio.service import TranscriptionEngine
from real_time_audio.vad import FrameScorer, SileroScorer

logger = logging.getLogger("real_time_audio")


def configure_logging(level: str) -> None:
    """Our log lines at `level`, with timestamps."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(level)


def create_app(
    settings: Settings | None = None,
    engine_factory: Callable[[Settings], TranscriptionEngine] = TranscriptionEngine.from_settings,
    vad_factory: Callable[[], FrameScorer] = SileroScorer.shared,
) -> FastAPI:
    """Build the application. The engine and the VAD model are loaded by the lifespan, not here."""
    settings = settings or load_settings()
    configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.audio_storage_dir.mkdir(parents=True, exist_ok=True)
        engine = engine_factory(settings)
        app.state.engine = engine
        if settings.vad != "off":
            app.state.vad_scorer = await asyncio.to_thread(vad_factory)
        await asyncio.to_thread(engine.start)
        logger.info(
            "ready: %s on %s, storage in %s", engine.model_id, engine.device, settings.audio_storage_dir.resolve()
        )
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)
            logger.info("engine stopped")

    app = FastAPI(title="Real-time audio transcription", version="1.0.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = None
    app.state.vad_scorer = None
    app.state.sessions = {}
    app.state.rest_active = 0  # POST /v1/audio/transcriptions requests in progress (count toward MAX_SESSIONS)
    app.state.draining = False  # set on SIGTERM: new sessions are refused while open ones finish
    # Called with the session id once a session's record is closed (e.g. to upload it); must not block.
    app.state.session_end_hooks = []
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


app = create_app()


if __name__ == "__main__":
    import uvicorn

    settings = app.state.settings
    uvicorn.run("main:app", host=settings.host, port=settings.port, log_level=settings.log_level.lower())
