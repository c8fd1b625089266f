"""`/ws/echo`: audio comes back after a delay, for checking a microphone-to-speaker loop.

The client connects (optionally with the same query parameters as `/ws/transcribe`, plus
`delay` in seconds), receives a `connected` status with its config and the delay, and every binary
frame it sends is sent back unchanged, in order, `delay` seconds after it arrived. `END` (or
`{"type": "end"}`) sends the frames still waiting, then closes with 1000. Nothing is transcribed
or stored.

Limits as for a transcription session: it counts toward MAX_SESSIONS and the per-address limit
(routes.py); at most ECHO_BUFFER_BYTES wait to be sent back, and beyond that the server stops
reading (TCP slows the client down); a client that does not read what is sent back for
IDLE_TIMEOUT_S is disconnected.
"""

from __future__ import annotations

import asyncio
import json

from starlette import status
from starlette.websockets import WebSocket, WebSocketDisconnect

from real_time_audio.config import Settings
from real_time_audio.messages import (
    CLOSE_IDLE,
    EndMessage,
    ErrorCode,
    ErrorMessage,
    KeepaliveMessage,
    ProtocolError,
    SessionConfig,
    apply_config,
    parse_client_text,
    query_config,
    to_json,
)
from real_time_audio.ops.tasks import stop_tasks
from real_time_audio.storage.layout import new_session_id

MAX_DELAY_S = 10.0
# Audio waiting to be sent back: ten seconds of 48 kHz stereo float32 (the largest raw format), and more.
ECHO_BUFFER_BYTES = 8 << 20


class ClientNotReading(Exception):
    """What the server sends back has not been read for IDLE_TIMEOUT_S."""


class EchoSession:
    def __init__(self, websocket: WebSocket, settings: Settings) -> None:
        self.ws = websocket
        self.settings = settings
        self.id = new_session_id()
        self.delay_s = settings.echo_delay_s
        self.config = SessionConfig()
        self._due: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        self._buffered = 0  # bytes in _due
        self._room = asyncio.Event()  # set while _buffered is under ECHO_BUFFER_BYTES
        self._room.set()

    def _configure(self, query: dict[str, str]) -> list[str]:
        problems = []
        if "delay" in query:
            try:
                delay = float(query["delay"])
                if not 0 <= delay <= MAX_DELAY_S:
                    raise ValueError
                self.delay_s = delay
            except ValueError:
                problems.append(f"delay: must be a number of seconds from 0 to {MAX_DELAY_S:g}, got {query['delay']!r}")
        try:
            self.config = apply_config(self.config, query_config(query))
        except ProtocolError as exc:
            problems.append(exc.message)
        return problems

    async def run(self) -> None:
        problems = self._configure(dict(self.ws.query_params))
        await self.ws.send_text(
            json.dumps(
                {
                    "type": "status",
                    "status": "connected",
                    "protocol": 1,
                    "session_id": self.id,
                    "config": self.config.wire(),
                    "delay": self.delay_s,
                }
            )
        )
        for problem in problems:
            await self._error("bad_config", problem)
        sender = asyncio.create_task(self._send_back())
        receiver = asyncio.create_task(self._receive())
        try:
            done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if receiver in done:
                receiver.result()
                self._due.put_nowait(None)  # END: send what is waiting, then close
                await sender
                await self.ws.close(status.WS_1000_NORMAL_CLOSURE)
            else:
                sender.result()  # it only ends early by failing: the client stopped reading
        except (WebSocketDisconnect, ClientNotReading):
            pass  # returning drops the connection
        finally:
            await stop_tasks((sender, receiver))

    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                message = await asyncio.wait_for(self.ws.receive(), self.settings.idle_timeout_s)
            except TimeoutError:
                await self._error("idle_timeout", f"no data for {self.settings.idle_timeout_s:g} s")
                await self.ws.close(CLOSE_IDLE)
                raise WebSocketDisconnect(CLOSE_IDLE) from None
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            data, text = message.get("bytes"), message.get("text")
            if data is not None:
                if len(data) > self.settings.max_frame_bytes:
                    await self._error(
                        "too_large",
                        f"binary frame of {len(data)} bytes exceeds the limit of {self.settings.max_frame_bytes} bytes",
                    )
                    await self.ws.close(status.WS_1009_MESSAGE_TOO_BIG)
                    raise WebSocketDisconnect(status.WS_1009_MESSAGE_TOO_BIG)
                self._due.put_nowait((loop.time() + self.delay_s, data))
                self._buffered += len(data)
                if self._buffered > ECHO_BUFFER_BYTES:  # back-pressure: read on once the client has caught up
                    self._room.clear()
                    await self._room.wait()
            elif text is not None:
                try:
                    parsed = parse_client_text(text)
                except ProtocolError as exc:
                    await self._error(exc.code, exc.message)
                    continue
                if isinstance(parsed, EndMessage):
                    return
                if not isinstance(parsed, KeepaliveMessage):
                    await self._error("bad_message", f"/ws/echo takes audio, keepalive and END; not {parsed.type}")

    async def _send_back(self) -> None:
        loop = asyncio.get_running_loop()
        while (item := await self._due.get()) is not None:
            due, data = item
            await asyncio.sleep(max(0.0, due - loop.time()))
            try:
                await asyncio.wait_for(self.ws.send_bytes(data), self.settings.idle_timeout_s)
            except TimeoutError:
                raise ClientNotReading from None
            self._buffered -= len(data)
            if self._buffered <= ECHO_BUFFER_BYTES:
                self._room.set()

    async def _error(self, code: ErrorCode, message: str) -> None:
        await self.ws.send_text(to_json(ErrorMessage(code=code, message=message)))
