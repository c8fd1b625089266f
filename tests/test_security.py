"""Access rules on their own: where a token may come from, who may read a record, which origins pass."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from starlette.requests import HTTPConnection

from real_time_audio.config import Settings, load_settings
from real_time_audio.ops.security import (
    check_access,
    chosen_subprotocol,
    may_read,
    origin_allowed,
    owner_of,
    presented_token,
    subprotocol_token,
    token_accepted,
)

TOKEN, OTHER, ADMIN = "user-token-1", "user-token-2", "admin-token"


def settings_with(tmp_path: Path, **overrides: object) -> Settings:
    return load_settings(transcription_model_id="unused", audio_storage_dir=tmp_path, **overrides)


def connection(
    kind: str = "http", headers: dict[str, str] | None = None, query: str = "", subprotocols: tuple[str, ...] = ()
) -> HTTPConnection:
    scope = {
        "type": kind,
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "query_string": query.encode(),
        "subprotocols": list(subprotocols),
        "path": "/",
    }
    return HTTPConnection(scope)


def carried(token: str) -> str:
    return "rta.token." + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


def test_where_a_token_comes_from() -> None:
    """Authorization first, then the subprotocol, then the query string."""
    bearer = {"authorization": f"Bearer {TOKEN}"}
    assert presented_token(bearer, {"token": OTHER}, [carried(ADMIN)]) == TOKEN
    assert presented_token({}, {"token": OTHER}, ["rta.v1", carried(ADMIN)]) == ADMIN
    assert presented_token({}, {"token": OTHER}) == OTHER
    assert presented_token({"authorization": "Basic abc"}, {}) is None
    assert presented_token({"authorization": "Bearer   "}, {}) is None


def test_the_token_subprotocol() -> None:
    assert subprotocol_token([carried("tok~en/+")]) == "tok~en/+"
    assert subprotocol_token(["rta.token.%%%"]) == ""  # presented, but not a token: refused like a wrong one
    assert subprotocol_token(["rta.v1"]) is None
    assert chosen_subprotocol(["rta.v1", carried(TOKEN)]) == "rta.v1"
    assert chosen_subprotocol([carried(TOKEN)]) is None  # the token is never echoed back


def test_tokens_accepted(tmp_path: Path) -> None:
    assert token_accepted(settings_with(tmp_path), None)  # no tokens configured: open
    guarded = settings_with(tmp_path, api_tokens=[TOKEN], admin_tokens=[ADMIN])
    assert token_accepted(guarded, TOKEN) and token_accepted(guarded, ADMIN)
    assert not token_accepted(guarded, OTHER) and not token_accepted(guarded, None)
    assert not token_accepted(guarded, "")


def test_who_may_read_a_record(tmp_path: Path) -> None:
    guarded = settings_with(tmp_path, api_tokens=[TOKEN, OTHER], admin_tokens=[ADMIN])
    owner = owner_of(guarded, connection(headers={"authorization": f"Bearer {TOKEN}"}))
    assert owner == hashlib.sha256(TOKEN.encode()).hexdigest()
    record = {"owner": owner}
    assert may_read(guarded, connection(query=f"token={TOKEN}"), record)
    assert may_read(guarded, connection(headers={"authorization": f"Bearer {ADMIN}"}), record)
    assert not may_read(guarded, connection(headers={"authorization": f"Bearer {OTHER}"}), record)
    assert may_read(guarded, connection(query=f"token={OTHER}"), {})  # made before tokens were set
    assert owner_of(settings_with(tmp_path), connection()) is None  # no tokens: no owner recorded


def test_origins(tmp_path: Path) -> None:
    allowed = settings_with(tmp_path, allowed_origins=["https://app.example"])
    assert origin_allowed(allowed, None)  # not a browser
    assert origin_allowed(allowed, "https://APP.example/")
    assert not origin_allowed(allowed, "https://evil.example")
    assert origin_allowed(settings_with(tmp_path), "https://anything.example")


def test_check_access_says_why(tmp_path: Path) -> None:
    guarded = settings_with(tmp_path, api_tokens=[TOKEN], allowed_origins=["https://app.example"])
    foreign = connection(headers={"origin": "https://evil.example", "authorization": f"Bearer {TOKEN}"})
    assert check_access(guarded, foreign) == (
        "forbidden_origin",
        "origin 'https://evil.example' is not allowed to use this server",
    )
    assert check_access(guarded, connection(query="token=nope")) == ("unauthorized", "the token is not valid")
    assert check_access(guarded, connection()) == (
        "unauthorized",
        "a token is required: send 'Authorization: Bearer <token>' or ?token=<token>",
    )
    websocket_message = check_access(guarded, connection("websocket"))
    assert websocket_message is not None and "rta.token.<base64url of the token>" in websocket_message[1]
    assert check_access(guarded, connection("websocket", subprotocols=("rta.v1", carried(TOKEN)))) is None
