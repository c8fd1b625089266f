"""Who may connect: API tokens, the browser origin allow-list, and per-address connection counts.

The same checks guard the WebSocket routes and the HTTP API. Tokens are compared in constant time
and never logged; a refusal names what was wrong, never the token that was sent.
"""

from __future__ import annotations

import hmac
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

from fastapi import HTTPException, Request
from starlette.requests import HTTPConnection

from real_time_audio.config import Settings

Refusal = Literal["unauthorized", "forbidden_origin"]


def presented_token(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The token from `Authorization: Bearer <token>`, else from `?token=`."""
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return query.get("token") or None


def token_accepted(settings: Settings, token: str | None) -> bool:
    """True when no tokens are configured or `token` equals one of them (constant-time, all compared)."""
    if not settings.api_tokens:
        return True
    given = (token or "").encode()
    matched = False
    for expected in settings.api_tokens:
        matched |= hmac.compare_digest(given, expected.get_secret_value().encode())
    return matched


def origin_allowed(settings: Settings, origin: str | None) -> bool:
    """Clients without an Origin header (CLIs, servers) pass; browsers must be on the allow-list."""
    allowed = settings.allowed_origins
    if not allowed or origin is None or "*" in allowed:
        return True
    return origin.lower().rstrip("/") in allowed


def check_access(settings: Settings, connection: HTTPConnection) -> tuple[Refusal, str] | None:
    """Why this connection may not proceed, or None. The origin is checked first: it needs no secret."""
    origin = connection.headers.get("origin")
    if not origin_allowed(settings, origin):
        return "forbidden_origin", f"origin {origin!r} is not allowed to use this server"
    token = presented_token(connection.headers, connection.query_params)
    if not token_accepted(settings, token):
        if token is None:
            return "unauthorized", "a token is required: send 'Authorization: Bearer <token>' or ?token=<token>"
        return "unauthorized", "the token is not valid"
    return None


async def require_access(request: Request) -> None:
    """FastAPI dependency for the HTTP API: 401 without a valid token, 403 for a foreign origin."""
    refusal = check_access(request.app.state.settings, request)
    if refusal is None:
        return
    code, message = refusal
    if code == "unauthorized":
        raise HTTPException(401, detail={"code": code, "message": message}, headers={"WWW-Authenticate": "Bearer"})
    raise HTTPException(403, detail={"code": code, "message": message})


def client_address(connection: HTTPConnection) -> str:
    """The peer's address (the proxy's, unless uvicorn/gunicorn trust its forwarded headers)."""
    return connection.client.host if connection.client else "unknown"


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
        self._open[address] += 1
        try:
            yield
        finally:
            self._open[address] -= 1
            if self._open[address] <= 0:
                del self._open[address]
