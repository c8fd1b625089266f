"""What the client shows while a session runs: partials rewritten in place, finals as lines."""

from __future__ import annotations

import shutil
import sys
from typing import Any, TextIO

_CLEAR_LINE = "\r\x1b[2K"


def clock(seconds: float) -> str:
    minutes, secs = divmod(max(0.0, seconds), 60)
    return f"{int(minutes):02d}:{secs:05.2f}"


class Console:
    """Prints a session's messages. On a terminal the current partial (and the progress) stays on
    one line that is rewritten; elsewhere (a pipe, a file) only finals are written."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, quiet: bool = False) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.quiet = quiet
        self.live = not quiet and self.out.isatty()
        self.progress = ""
        self._partial = ""

    def on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "transcription":
            if message["is_final"]:
                self._partial = ""
                if message["text"].strip():
                    self.line(f"[{clock(message['start'])} → {clock(message['end'])}] {message['text'].strip()}")
            else:
                self._partial = message["text"].strip()
                self._redraw()
        elif kind == "error":
            self.problem(f"server error {message.get('code')}: {message.get('message')}")
        elif kind == "status" and message.get("status") == "connected" and not self.quiet:
            config = message.get("config", {})
            self.note(
                f"session {message.get('session_id')} on {message.get('model')} ({message.get('device')}), "
                f"{config.get('encoding')}"
            )

    def set_progress(self, text: str) -> None:
        self.progress = text
        self._redraw()

    def line(self, text: str) -> None:
        """A permanent line on stdout (a final)."""
        if self.quiet:
            return
        if self.live:
            self.out.write(_CLEAR_LINE)
        self.out.write(text + "\n")
        self._redraw()

    def note(self, text: str) -> None:
        """Information for the person watching, on stderr."""
        if not self.quiet:
            self._clear()
            self.err.write(text + "\n")
            self.err.flush()
            self._redraw()

    def problem(self, text: str) -> None:
        self._clear()
        self.err.write(text + "\n")
        self.err.flush()
        self._redraw()

    def finish(self) -> None:
        self._clear()
        self.out.flush()

    def _clear(self) -> None:
        if self.live:
            self.out.write(_CLEAR_LINE)
            self.out.flush()

    def _redraw(self) -> None:
        if not self.live:
            return
        width = shutil.get_terminal_size((100, 20)).columns - 1
        text = " ".join(part for part in (self.progress and f"[{self.progress}]", self._partial) if part)
        if len(text) > width:
            text = "…" + text[-(width - 1) :]
        self.out.write(f"{_CLEAR_LINE}\x1b[2m{text}\x1b[0m")
        self.out.flush()
