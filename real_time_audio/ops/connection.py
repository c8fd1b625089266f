"""What ASGI does not tell an application about its WebSocket, taken from uvicorn's protocol object.

Two things matter to a session and neither passes through ASGI:

- **Client pings.** The protocol says WebSocket pings reset the idle timer, but the server answers
  them itself. We note the time of each one.
- **The server's keepalive.** uvicorn pings every client and drops one whose pong is late. A pong
  travels behind the audio the client already sent; while back-pressure has the session read
  slowly, it can be late although the client is healthy. While the session says so, a late pong
  schedules the next ping instead of closing the connection. Dead clients are still found: the
  session's own idle timeout closes a connection from which nothing arrives.

Both work with uvicorn's `websockets-sansio` (its default) and `wsproto` implementations, found
through the bound `receive` callable that uvicorn hands to the application. Under any other server
nothing is changed: `last_ping` stays 0.0 and only frames reset the idle timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from starlette.websockets import WebSocket


class ConnectionHooks:
    def __init__(self, websocket: WebSocket, pongs_may_be_late: Callable[[], bool]) -> None:
        self.last_ping = 0.0  # event-loop time of the client's last ping
        self._loop = asyncio.get_running_loop()
        self._pongs_may_be_late = pongs_may_be_late
        protocol = getattr(getattr(websocket, "_receive", None), "__self__", None)
        if protocol is None:
            return
        self._protocol = protocol
        handle_ping = getattr(protocol, "handle_ping", None)
        if callable(handle_ping):
            protocol.handle_ping = self._noting(handle_ping)
        keepalive_timeout = getattr(protocol, "keepalive_timeout", None)
        if callable(keepalive_timeout) and callable(getattr(protocol, "schedule_ping", None)):
            protocol.keepalive_timeout = self._forgiving(keepalive_timeout)

    def _noting(self, handle_ping: Callable[..., Any]) -> Callable[..., Any]:
        def noting(*args: Any) -> Any:
            self.last_ping = self._loop.time()
            return handle_ping(*args)

        return noting

    def _forgiving(self, keepalive_timeout: Callable[[], None]) -> Callable[[], None]:
        def forgiving() -> None:
            protocol = self._protocol
            if not self._pongs_may_be_late():
                keepalive_timeout()
                return
            protocol.pong_timer = None  # the pong is on its way behind the audio: ping again later
            protocol.pending_ping_payload = None
            if protocol.ping_interval:
                protocol.schedule_ping()

        return forgiving
