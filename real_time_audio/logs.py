"""Log lines: one per event, carrying the session id; readable text or one JSON object per line.

Sessions log through a LoggerAdapter that puts `session_id` on each record; the formatters show
it when present. With LOG_FORMAT=json, uvicorn's and gunicorn's own loggers get the JSON
formatter too, so a log collector sees one format.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal

# Loggers that servers set up with handlers of their own.
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "gunicorn.error", "gunicorn.access")
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
