"""One client connection to `/ws/transcribe`: connect, send audio, receive texts, end."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection

DEFAULT_URI = "ws://127.0.0.1:8000/ws/transcribe"
EXIT_SERVER_ERROR = 1
EXIT_CONNECT = 3


class ClientError(Exception):
    """A failure the command reports on stderr before exiting with `exit_code`."""

    def __init__(self, message: str, exit_code: int = EXIT_SERVER_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(slots=True)
class ClientOptions:
    """How to reach the server and how to configure the session."""

    uri: str = DEFAULT_URI
    token: str | None = None
    encoding: str = "pcm_s16le"
    sample_rate: int | None = None
    channels: int | None = None
    language: str | None = None
    task: str | None = None
    prompt: str | None = None
    interim_results: bool = True
    open_timeout_s: float = 30.0

    def url(self) -> str:
        """The session URL with the configuration in its query string (the prompt goes in a message)."""
        params: dict[str, Any] = {"encoding": self.encoding}
        for name in ("sample_rate", "channels", "language", "task"):
            value = getattr(self, name)
            if value is not None:
                params[name] = value
        if not self.interim_results:
            params["interim_results"] = "false"
        parts = urlsplit(self.uri)
        query = "&".join(q for q in (parts.query, urlencode(params)) if q)
        return urlunsplit((parts.scheme, parts.netloc, parts.path or "/ws/transcribe", query, ""))


@dataclass(slots=True)
class SessionResult:
    """Everything a finished session produced, with the client-side timings (monotonic seconds)."""

    session_id: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    completed: dict[str, Any] | None = None
    close_code: int | None = None
    close_reason: str = ""
    sent_bytes: int = 0
    sent_sha256: str = hashlib.sha256().hexdigest()
    connected_at: float | None = None
    first_audio_at: float | None = None
    first_text_at: float | None = None
    end_sent_at: float | None = None
    completed_at: float | None = None

    @property
    def finals(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == "transcription" and m.get("is_final")]

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == "error"]

    @property
    def sha256_ok(self) -> bool:
        return self.completed is not None and self.completed["recording"]["sha256"] == self.sent_sha256

    @property
    def ok(self) -> bool:
        return self.completed is not None and self.close_code == 1000 and not self.errors and self.sha256_ok

    def problems(self) -> list[str]:
        """Why the session is not `ok`, one readable line each."""
        lines = [f"server error {e.get('code')}: {e.get('message')}" for e in self.errors]
        if self.completed is None:
            reason = f"code {self.close_code} {self.close_reason}".strip()
            lines.append(f"the connection closed without a completed status ({reason})")
        elif not self.sha256_ok:
            lines.append(
                f"the server recorded sha256 {self.completed['recording']['sha256']} "
                f"but the client sent {self.sent_sha256} ({self.sent_bytes} bytes)"
            )
        return lines


class LiveSession:
    """A connected session. Messages go to `on_message` as they arrive, in order."""

    def __init__(self, options: ClientOptions, on_message: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.options = options
        self.result = SessionResult()
        self._on_message = on_message or (lambda message: None)
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sha = hashlib.sha256()
        self._connected = asyncio.Event()

    def reset(self) -> None:
        """Forget a failed connection attempt, so that `connect` can try again."""
        self.result = SessionResult()
        self._ws = None
        self._reader = None
        self._sha = hashlib.sha256()
        self._connected = asyncio.Event()

    async def __aenter__(self) -> LiveSession:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> dict[str, Any]:
        """Open the connection and wait for `connected`; a refusal raises ClientError with its reason."""
        headers = {"Authorization": f"Bearer {self.options.token}"} if self.options.token else None
        try:
            self._ws = await websockets.connect(
                self.options.url(),
                additional_headers=headers,
                max_size=None,
                open_timeout=self.options.open_timeout_s,
                # Sent faster than real time, our pings wait behind audio the server reads slowly
                # (back-pressure), so a late pong proves nothing; the server's idle timeout and TCP
                # still end a dead connection.
                ping_timeout=None,
            )
        except (OSError, TimeoutError, websockets.InvalidURI, websockets.InvalidHandshake) as exc:
            raise ClientError(f"cannot connect to {self.options.uri}: {exc}", EXIT_CONNECT) from None
        self._reader = asyncio.create_task(self._read())
        # Until `connected` arrives, or the server closes the connection (a refusal), or the time is up.
        connected = asyncio.ensure_future(self._connected.wait())
        waiting = {connected, self._reader}
        await asyncio.wait(waiting, timeout=self.options.open_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        connected.cancel()
        if not self._connected.is_set():
            await self._ws.close()  # no `connected` in time: give up on this connection
            await self._reader
            raise ClientError("; ".join(self.result.problems()) or "the server refused the session")
        if self.options.prompt:
            await self._ws.send(json.dumps({"type": "config", "prompt": self.options.prompt}))
        return self.result.messages[0]

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for raw in self._ws:
                if isinstance(raw, bytes):
                    continue
                message = json.loads(raw)
                now = time.monotonic()
                self.result.messages.append(message)
                if message.get("type") == "status":
                    if message.get("status") == "connected":
                        self.result.session_id = message["session_id"]
                        self.result.connected_at = now
                        self._connected.set()
                    elif message.get("status") == "completed":
                        self.result.completed = message
                        self.result.completed_at = now
                elif message.get("type") == "transcription" and self.result.first_text_at is None:
                    self.result.first_text_at = now
                self._on_message(message)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.result.close_code = self._ws.close_code
            self.result.close_reason = self._ws.close_reason or ""

    @property
    def open(self) -> bool:
        return self._reader is not None and not self._reader.done()

    async def send_audio(self, chunk: bytes) -> None:
        """Send one binary frame; waits while the server applies back-pressure."""
        assert self._ws is not None
        if self.result.first_audio_at is None:
            self.result.first_audio_at = time.monotonic()
        try:
            await self._ws.send(chunk)
        except websockets.ConnectionClosed:
            raise ClientError("; ".join(self.result.problems()) or "the server closed the connection") from None
        self._sha.update(chunk)
        self.result.sent_bytes += len(chunk)
        self.result.sent_sha256 = self._sha.hexdigest()

    async def send_json(self, message: dict[str, Any]) -> None:
        assert self._ws is not None
        with contextlib.suppress(websockets.ConnectionClosed):
            await self._ws.send(json.dumps(message))

    async def end(self, timeout_s: float | None = None) -> SessionResult:
        """Send END and wait until the server has sent its finals, `completed` and closed."""
        assert self._ws is not None and self._reader is not None
        self.result.end_sent_at = time.monotonic()
        with contextlib.suppress(websockets.ConnectionClosed):
            await self._ws.send("END")
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout_s)
        except TimeoutError:
            raise ClientError(f"no completed status within {timeout_s:g} s of END") from None
        return self.result

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
