"""Who may connect: API tokens, the browser origin allow-list, and per-address connection counts.

The same checks guard the WebSocket routes and the HTTP API. Tokens are compared in constant time
and never logged; a refusal names what was wrong, never the token that was sent.

A browser cannot set headers on a WebSocket, so besides `Authorization: Bearer` (and the older
`?token=`, which ends up in URLs) it may offer the token as a WebSocket subprotocol:
`new WebSocket(url, ["rta.v1", "rta.token." + base64url(token)])`. The server then selects
`rta.v1`, so the token is never echoed back.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Literal

from fastapi import HTTPException, Request
from pydantic import SecretStr
from starlette.requests import HTTPConnection

from real_time_audio.config import Settings
from real_time_audio.state import State

Refusal = Literal["unauthorized", "forbidden_origin"]


SUBPROTOCOL = "rta.v1"
TOKEN_SUBPROTOCOL_PREFIX = "rta.token."


def subprotocol_token(offered: Sequence[str]) -> str | None:
    """The token carried by an offered `rta.token.<base64url>` subprotocol, if any."""
    for name in offered:
        if name.startswith(TOKEN_SUBPROTOCOL_PREFIX):
            encoded = name[len(TOKEN_SUBPROTOCOL_PREFIX) :]
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return ""  # presented, but not a token: refused like a wrong one
    return None


def chosen_subprotocol(offered: Sequence[str]) -> str | None:
    """The subprotocol to accept: `rta.v1` when offered (never a token-carrying one)."""
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


def presented_token(
    headers: Mapping[str, str], query: Mapping[str, str], subprotocols: Sequence[str] = ()
) -> str | None:
    """The token from `Authorization: Bearer <token>`, else from an `rta.token.` subprotocol, else from `?token=`."""
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    carried = subprotocol_token(subprotocols)
    if carried is not None:
        return carried
    return query.get("token") or None


def _matches(token: str | None, candidates: Sequence[SecretStr]) -> bool:
    """Whether `token` equals one of `candidates` (constant-time, every one compared)."""
    given = (token or "").encode()
    matched = False
    for expected in candidates:
        matched |= hmac.compare_digest(given, expected.get_secret_value().encode())
    return matched


def auth_enabled(settings: Settings) -> bool:
    return bool(settings.api_tokens or settings.admin_tokens)


def token_accepted(settings: Settings, token: str | None) -> bool:
    """True when no tokens are configured or `token` equals one of them (API or admin tokens)."""
    if not auth_enabled(settings):
        return True
    return _matches(token, [*settings.api_tokens, *settings.admin_tokens])


def is_admin(settings: Settings, token: str | None) -> bool:
    return bool(settings.admin_tokens) and _matches(token, settings.admin_tokens)


def owner_of(settings: Settings, connection: HTTPConnection) -> str | None:
    """Who a session created over this connection belongs to: a digest of the token presented
    (never the token), or None when the server needs no token."""
    if not auth_enabled(settings):
        return None
    token = presented_token(connection.headers, connection.query_params, connection.scope.get("subprotocols") or ())
    return hashlib.sha256((token or "").encode()).hexdigest()


def may_read(settings: Settings, connection: HTTPConnection, metadata: Mapping[str, object]) -> bool:
    """Whether this (already admitted) connection may read a stored session: its owner or an admin
    token; anyone admitted when the server needs no token, or when the session was made without
    one (before tokens were set)."""
    owner = metadata.get("owner")
    if not auth_enabled(settings) or owner is None:
        return True
    token = presented_token(connection.headers, connection.query_params, connection.scope.get("subprotocols") or ())
    if is_admin(settings, token):
        return True
    return isinstance(owner, str) and hmac.compare_digest(owner, owner_of(settings, connection) or "")


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
    token = presented_token(connection.headers, connection.query_params, connection.scope.get("subprotocols") or ())
    if not token_accepted(settings, token):
        if token is None and connection.scope["type"] == "websocket":
            return (
                "unauthorized",
                "a token is required: send 'Authorization: Bearer <token>', offer the WebSocket subprotocol "
                "'rta.token.<base64url of the token>' (with 'rta.v1'), or add ?token=<token>",
            )
        if token is None:
            return "unauthorized", "a token is required: send 'Authorization: Bearer <token>' or ?token=<token>"
        return "unauthorized", "the token is not valid"
    return None


async def require_access(request: Request, state: State) -> None:
    """FastAPI dependency for the HTTP API: 401 without a valid token, 403 for a foreign origin."""
    refusal = check_access(state.settings, request)
    if refusal is None:
        return
    code, message = refusal
    if code == "unauthorized":
        raise HTTPException(401, detail={"code": code, "message": message}, headers={"WWW-Authenticate": "Bearer"})
    raise HTTPException(403, detail={"code": code, "message": message})


def client_address(connection: HTTPConnection) -> str:
    """The peer's address (the proxy's, unless uvicorn/gunicorn trust its forwarded headers)."""
    return connection.client.host if connection.client else "unknown"
