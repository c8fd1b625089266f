"""How uvicorn and gunicorn serve the app: connection limits and deadlines for slow clients.

uvicorn on its own never times out a client that opens a connection and then sends its request
head slowly (or not at all), so a few hundred such sockets would hold the process's file
descriptors for ever. Here:
- `HttpProtocol` (uvicorn's httptools protocol, or h11's where httptools is missing) closes a
  connection whose request head is not complete `HEADER_TIMEOUT_S` after it opened, or after the
  previous response on a kept-alive connection;
- `server_options` adds `limit_concurrency` (MAX_CONNECTIONS: HTTP requests beyond it get 503)
  and the keep-alive timeout, for `python main.py` and for the gunicorn worker;
- `UvicornWorker` is the gunicorn worker class with those options (gunicorn.conf.py names it).

Request bodies (uploads) have their own deadlines, enforced by the route that reads them.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn_worker import UvicornWorker as _BaseWorker

from real_time_audio.config import Settings, load_settings

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is a dependency; h11 serves without it
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


def _header_timeout() -> float:
    return load_settings().header_timeout_s


class _HeadDeadline:
    """A deadline for the request head: armed when a connection opens and after each response on
    a kept-alive connection, disarmed once the head is complete (each protocol says when), and
    closing the transport when it passes. Mixed in before uvicorn's protocol class."""

    header_timeout_s = _header_timeout()
    _head_timer: asyncio.TimerHandle | None = None
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    timeout_keep_alive_task: asyncio.TimerHandle | None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if self.timeout_keep_alive_task is not None:  # kept alive, waiting for the next request
            self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_deadline_passed)

    def _disarm_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_deadline_passed(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


if HttpToolsProtocol is not None:

    class HttpToolsWithDeadline(_HeadDeadline, HttpToolsProtocol):  # type: ignore[misc]
        def on_headers_complete(self) -> None:
            self._disarm_head_deadline()
            super().on_headers_complete()


class H11WithDeadline(_HeadDeadline, H11Protocol):  # type: ignore[misc]
    def data_received(self, data: bytes) -> None:
        scope = self.scope
        super().data_received(data)
        if self.scope is not scope or self.transport.get_protocol() is not self:
            self._disarm_head_deadline()  # a new request's head was parsed (or the socket upgraded)


HttpProtocol: type = HttpToolsWithDeadline if HttpToolsProtocol is not None else H11WithDeadline


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn options for serving the app (also passed to gunicorn's uvicorn worker)."""
    return {
        "http": HttpProtocol,
        "limit_concurrency": settings.max_connections or None,
        "timeout_keep_alive": 5,
    }


class UvicornWorker(_BaseWorker):  # type: ignore[misc]
    """gunicorn's uvicorn worker with the same connection limits and deadlines as `python main.py`."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {**_BaseWorker.CONFIG_KWARGS, **server_options(load_settings())}
