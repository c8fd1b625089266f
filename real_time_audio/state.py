"""The server's shared state, typed: one `ServerState` per application, built by `main.create_app`
and filled in by its lifespan (the engine and the voice model load there).

Routes reach it through the `State` dependency. It also holds the admission rules every way in
shares (live sessions, uploads, echo loops): shutting down, connections per client address, the
engine's health and MAX_SESSIONS.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import Depends
from starlette.requests import HTTPConnection

from real_time_audio.config import Settings
from real_time_audio.ops.metrics import Metrics

if TYPE_CHECKING:
    from real_time_audio.audio.vad import FrameScorer
    from real_time_audio.handler import Session
    from real_time_audio.service import TranscriptionEngine
    from real_time_audio.storage.archive import SessionArchive

logger = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class Refusal:
    """Why a new session (or upload, or echo loop) is not taken now."""

    reason: Literal["draining", "address", "engine", "capacity"]
    message: str
    detail: str = ""  # the engine's own reason, or the session limit, for the HTTP API's own wording


@dataclass(eq=False)
class ServerState:
    """Everything the routes share. Mutated on the event loop only (the archive's own thread
    reads nothing here)."""

    settings: Settings
    metrics: Metrics
    connections: ConnectionCounter
    archive: SessionArchive | None = None  # uploads of finished sessions (S3_BUCKET)
    engine: TranscriptionEngine | None = None  # set by the lifespan once the model is loaded
    vad_scorer: FrameScorer | None = None  # the shared Silero model (None with VAD=off)
    sessions: dict[str, Session] = field(default_factory=dict)  # open live sessions by id
    # Sessions' final releases (record closed, decoder stopped) still running: shutdown waits for them.
    releasing: set[asyncio.Future[None]] = field(default_factory=set)
    echo_active: int = 0  # /ws/echo loops
    rest_active: int = 0  # POST /v1/audio/transcriptions requests being transcribed
    draining: bool = False  # set on SIGTERM: new sessions are refused while open ones finish
    # Called with the session id once a session's record is closed (e.g. to upload it); must not block.
    session_end_hooks: list[Callable[[str], None]] = field(default_factory=list)

    @classmethod
    def create(cls, settings: Settings, metrics: Metrics, archive: SessionArchive | None) -> ServerState:
        state = cls(settings, metrics, ConnectionCounter(settings.max_connections_per_client), archive)
        if archive is not None:
            state.session_end_hooks.append(archive.enqueue)
        return state

    # -- admission ------------------------------------------------------------------------------

    @property
    def session_limit(self) -> int:
        """MAX_SESSIONS; with `auto`, what the engine measured (1 until it has)."""
        limit = self.settings.max_sessions
        if limit != "auto":
            return limit
        capacity = self.engine.capacity if self.engine is not None else None
        return capacity.sessions if capacity is not None else 1

    @property
    def active_sessions(self) -> int:
        """What counts against MAX_SESSIONS: live transcriptions, uploads being transcribed, echo loops."""
        return len(self.sessions) + self.rest_active + self.echo_active

    def refuse_new(self, address: str | None = None) -> Refusal | None:
        """Shutting down, or (given the client's `address`) too many connections from it."""
        if self.draining:
            return Refusal("draining", "the server is shutting down; try again shortly")
        if address is not None and self.connections.full(address):
            limit = self.connections.limit
            return Refusal("address", f"too many connections from {address}: the limit is {limit} at a time")
        return None

    def refuse_engine(self) -> Refusal | None:
        """The engine is not serving (still loading, or dead)."""
        engine = self.engine
        if engine is not None and engine.ready:
            return None
        detail = engine.dead_reason if engine is not None and engine.dead_reason else "the model is not loaded yet"
        return Refusal("engine", "the transcription engine is not available", detail)

    def refuse_capacity(self) -> Refusal | None:
        """The server is at MAX_SESSIONS."""
        limit = self.session_limit
        if self.active_sessions < limit:
            return None
        return Refusal("capacity", f"the server is at its limit of {limit} sessions", str(limit))

    def unready(self) -> str | None:
        """Why a load balancer should send new sessions elsewhere now (None: send them here).

        Shutting down, the engine not serving, or every session slot taken: /ready answers 503
        with this reason, while the sessions already open go on.
        """
        if self.draining:
            return "shutting down"
        engine = self.engine
        if engine is None or not engine.ready:
            return engine.dead_reason if engine is not None and engine.dead_reason else "model not loaded"
        if self.active_sessions >= self.session_limit:
            return f"at capacity: {self.active_sessions} of {self.session_limit} sessions"
        return None

    def serving_engine(self) -> TranscriptionEngine:
        """The engine, once `refuse_engine` has said it serves."""
        assert self.engine is not None, "the engine is not loaded"
        return self.engine

    # -- endings --------------------------------------------------------------------------------

    def session_ended(self, session_id: str) -> None:
        """A session's record is closed: tell the hooks (each failure is logged, the others still run)."""
        for hook in self.session_end_hooks:
            try:
                hook(session_id)
            except Exception:
                logger.exception("session-end hook %r failed for %s", hook, session_id)

    def worst_lag(self) -> float:
        return max((session.lag for session in self.sessions.values()), default=0.0)


class ConnectionCounter:
    """Open WebSocket connections per client address, for MAX_CONNECTIONS_PER_CLIENT."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()

    def count(self, address: str) -> int:
        return self._open[address]

    def full(self, address: str) -> bool:
        return self.limit > 0 and self._open[address] >= self.limit

    @contextmanager
    def hold(self, address: str) -> Iterator[None]:
        slot = self.acquire(address)
        try:
            yield
        finally:
            slot.release()

    def acquire(self, address: str) -> Slot:
        """Count one more connection from `address` until the slot is released."""
        self._open[address] += 1
        return Slot(self, address)

    def _release(self, address: str) -> None:
        self._open[address] -= 1
        if self._open[address] <= 0:
            del self._open[address]


class Slot:
    """One counted connection; `release` may be called more than once."""

    def __init__(self, counter: ConnectionCounter, address: str) -> None:
        self._counter: ConnectionCounter | None = counter
        self._address = address

    def release(self) -> None:
        counter, self._counter = self._counter, None
        if counter is not None:
            counter._release(self._address)


def server_state(connection: HTTPConnection) -> ServerState:
    """The application's ServerState."""
    state: ServerState = connection.app.state.server
    return state


async def _server_state(connection: HTTPConnection) -> ServerState:
    # A coroutine, so that FastAPI resolves it on the event loop rather than in a worker thread.
    return server_state(connection)


State = Annotated[ServerState, Depends(_server_state)]
