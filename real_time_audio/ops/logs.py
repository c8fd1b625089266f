"""Log lines: one per event, carrying the session id; readable text or one JSON object per line.

Sessions log through a LoggerAdapter that puts `session_id` on each record; the formatters show
it when present. With LOG_FORMAT=json, uvicorn's and gunicorn's own loggers get the JSON
formatter too, so a log collector sees one format.

Secrets never reach a log line: a filter on every server logger (and on our own handler) rewrites
`token=` in URLs, `Authorization` headers and token-carrying WebSocket subprotocols to `[REDACTED]`
before anything is formatted, in uvicorn's and gunicorn's access and error logs alike. The same
filter escapes control characters in the values put into a line (`\n` for a newline), so that
nothing a client sends (a field name, a file name) can forge a log line of its own.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Literal

# Loggers that servers set up with handlers of their own.
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "gunicorn.error", "gunicorn.access")
# Loggers that may see a request line or headers (uvicorn logs WebSocket requests on uvicorn.error,
# the whole ASGI scope on uvicorn.asgi at TRACE; websockets logs headers at DEBUG).
REDACTED_LOGGERS = (*SERVER_LOGGERS, "uvicorn.asgi", "websockets", "websockets.server", "real_time_audio")
REDACTED = "[REDACTED]"
_SECRETS = (
    re.compile(r"((?:[?&]|%3[Ff]|%26)(?:token|access_token|api_key)(?:=|%3[Dd]))[^&#\s\"']*", re.IGNORECASE),
    re.compile(
        r"((?:proxy-)?authorization['\"]?\s*[:,=]\s*(?:b(?=['\"]))?['\"]?"
        r"(?:(?:bearer|basic|token)\s+)?)[^\s'\",)]+",
        re.IGNORECASE,
    ),
    re.compile(r"(rta\.token\.)[A-Za-z0-9_=-]+"),
)


def redact(text: str) -> str:
    """`text` with every token-like secret replaced by [REDACTED]."""
    for pattern in _SECRETS:
        text = pattern.sub(lambda match: match.group(1) + REDACTED, text)
    return text


_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """`text` on one line: control characters written as escapes (`\n`, `\x1b`)."""
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


def _redact_value(value: object) -> object:
    if isinstance(value, str):
        return escape_controls(redact(value))
    if isinstance(value, bytes):
        return escape_controls(redact(value.decode("latin-1")))
    if isinstance(value, dict | list | tuple):  # a scope or a header list, as uvicorn.asgi logs them
        return redact(repr(value))
    return value


class RedactSecrets(logging.Filter):
    """Rewrites a record's message and arguments so that no token can be formatted into a line, and
    no argument can break the line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_value(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: _redact_value(value) for key, value in record.args.items()}
        return True


_FILTER = RedactSecrets()


def install_redaction() -> None:
    """Put the filter on every logger that can see a URL or a header, and on their handlers (a
    filter on a logger does not apply to what its children propagate to it)."""
    for name in REDACTED_LOGGERS:
        target = logging.getLogger(name)
        if _FILTER not in target.filters:
            target.addFilter(_FILTER)
        for handler in target.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
    for handler in logging.getLogger().handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


# Attributes every LogRecord has; anything else was passed as `extra` and goes into the JSON.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", "session_id"?, ..., "exception"?}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool | None) else repr(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [session]: message`, the session part only when the record has one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(session)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        session_id = getattr(record, "session_id", None)
        record.session = f" [{session_id}]" if session_id else ""
        return super().format(record)


def configure_logging(level: str, fmt: Literal["text", "json"] = "text") -> None:
    """Our loggers at `level`, written to stderr in the chosen format."""
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    ours = logging.getLogger("real_time_audio")
    ours.setLevel(level)
    root_handled = bool(logging.getLogger().handlers)  # e.g. gunicorn's logconfig_dict, or pytest
    if not root_handled and not any(getattr(existing, "_rta", False) for existing in ours.handlers):
        stream = logging.StreamHandler(sys.stderr)
        stream._rta = True  # type: ignore[attr-defined]
        ours.addHandler(stream)
    targets = [h for h in ours.handlers if getattr(h, "_rta", False)]
    if fmt == "json":
        targets += [h for name in SERVER_LOGGERS for h in logging.getLogger(name).handlers]
    for handler in targets:
        handler.setFormatter(formatter)
    install_redaction()
