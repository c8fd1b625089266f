"""Going on after a session the server ended early: where to resend from, and one timeline of finals.

Used by `stream --reconnect` and by the microphone mode. The server's `shutting_down` message
(sent before a close with 1001) names the byte offset of the audio to resend and the first of the
session's finals that a new session hearing it replaces; after a dropped connection the audio after
the last final is resent.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from rta_client.console import Console
from rta_client.session import EXIT_CONNECT, ClientError, LiveSession, SessionResult

# Close codes after which the stream goes on in a new session: going away (a restart), abnormal
# (the connection dropped), internal error, service restart, try again later (full).
RETRYABLE_CLOSES = frozenset({1001, 1006, 1011, 1012, 1013})
RECONNECT_FIRST_S = 0.25
RECONNECT_MAX_S = 4.0
CONTEXT_CHARS = 200  # of the text so far, as the next session's prompt (the server's CONTEXT_PROMPT_CHARS)


@dataclass(slots=True)
class Timeline:
    """The finals of consecutive sessions over one stream, on the stream's own clock."""

    messages: list[dict[str, Any]] = field(default_factory=list)  # every final kept, shifted and renumbered
    offset_s: float = 0.0  # where the current session's audio starts in the stream
    first_segment: int = 0  # the stream-wide id of the current session's segment 0
    closed: int = 0  # sessions that ended early, whose finals are in `messages`

    def shifted(self, message: dict[str, Any]) -> dict[str, Any]:
        """A message of the current session on the stream's clock (finals and partials)."""
        if message.get("type") != "transcription":
            return message
        moved = dict(message, segment_id=self.first_segment + message["segment_id"])
        moved["start"] = round(message["start"] + self.offset_s, 3)
        moved["end"] = round(message["end"] + self.offset_s, 3)
        if message.get("words"):
            moved["words"] = [
                dict(w, start=round(w["start"] + self.offset_s, 3), end=round(w["end"] + self.offset_s, 3))
                for w in message["words"]
            ]
        return moved

    def context(self, user_prompt: str | None, chars: int = CONTEXT_CHARS) -> str | None:
        """The prompt for the next session: the caller's own, then the end of the text so far, so
        that the next session hears its first words with what came before them (as the session it
        replaces would have)."""
        text = " ".join(m["text"].strip() for m in self.messages if m["text"].strip())
        if len(text) > chars:
            text = text[-chars:].partition(" ")[2]
        return " ".join(part for part in (user_prompt, text) if part) or None

    def close_session(self, result: SessionResult, keep_below: int | None) -> None:
        """Keep the session's finals (those with an id below `keep_below`, or all)."""
        for final in result.finals:
            if keep_below is None or final["segment_id"] < keep_below:
                self.messages.append(self.shifted(final))
        self.first_segment = self.messages[-1]["segment_id"] + 1 if self.messages else 0
        self.closed += 1


def joined(result: SessionResult, timeline: Timeline) -> SessionResult:
    """The last session's result (its `completed`, close code and checksum) with the finals of every
    session on one timeline (as it is when there was only one session)."""
    if not timeline.closed:
        return result
    timeline.close_session(result, None)
    result.messages = [m for m in result.messages if m.get("type") != "transcription"] + timeline.messages
    return result


def resume_point(result: SessionResult, base: int, frame: int, bytes_per_s: int) -> tuple[int, int | None]:
    """Where to resend from after `result`'s session ended early, and the first of its segment
    ids that the next session replaces (None: keep them all)."""
    shutdown = next((m for m in reversed(result.messages) if m.get("status") == "shutting_down"), None)
    if shutdown is not None and shutdown["resume"].get("bytes") is not None:
        resume = shutdown["resume"]
        return base + int(resume["bytes"]), int(resume["segment_id"])
    # No word from the server: from the end of the last final (what lies after it is heard again).
    finals = result.finals
    covered = round(finals[-1]["end"] * bytes_per_s) if finals else 0
    covered -= covered % frame
    return base + min(covered, result.sent_bytes - result.sent_bytes % frame), None


async def open_session(session: LiveSession, console: Console | None, timeout_s: float) -> None:
    """Open the session, retrying refusals and failed connections with a growing pause."""
    deadline = time.monotonic() + timeout_s
    pause = RECONNECT_FIRST_S
    while True:
        try:
            await session.connect()
            return
        except ClientError as exc:
            code = session.result.close_code
            retryable = exc.exit_code == EXIT_CONNECT or code in RETRYABLE_CLOSES
            if not retryable or time.monotonic() + pause > deadline:
                raise
            if console:
                console.note(f"{exc}; trying again in {pause:.2f} s")
        await asyncio.sleep(pause)
        pause = min(RECONNECT_MAX_S, pause * 2)
        session.reset()
