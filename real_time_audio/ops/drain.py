"""Graceful shutdown: on SIGTERM, open sessions get the finals for the audio they already sent.

uvicorn (and gunicorn's uvicorn workers) answer SIGTERM by closing every WebSocket at once with
1012. We get there first: the app's handler wraps the server's, marks the app as draining (new
sessions are refused and /ready turns 503), asks every session to stop reading and finalize, waits
up to DRAIN_TIMEOUT_S for them to send their last finals and close with 1001, closes the stragglers
with 1001, and only then passes the signal on to the server, which shuts down as usual.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from real_time_audio.state import ServerState

logger = logging.getLogger(__name__)

DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
POLL_S = 0.05


async def drain(state: ServerState, timeout_s: float) -> int:
    """Finish every open session (finals, then close 1001) and wait for HTTP transcriptions.

    Returns the number of sessions that had to be closed before their finals were sent.
    """
    state.draining = True
    sessions = list(state.sessions.values())
    logger.info("draining %d session(s) and %d request(s)", len(sessions), state.rest_active)
    for session in sessions:
        session.drain()
    deadline = time.monotonic() + timeout_s
    while (state.sessions or state.rest_active) and time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)
    late = list(state.sessions.values())
    for session in late:
        logger.warning("session %s did not finish within %.0f s; closing it", session.id, timeout_s)
        await session.stop_now()
    logger.info("drained: %d session(s) finished, %d closed early", len(sessions) - len(late), len(late))
    return len(late)


def install_signal_handlers(state: ServerState, timeout_s: float) -> bool:
    """Wrap the server's SIGTERM/SIGINT handlers with a drain. Only possible in the main thread
    (a server run from a test thread keeps its own handlers); returns whether it was installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {sig: signal.getsignal(sig) for sig in DRAIN_SIGNALS}
    started: list[asyncio.Task[None]] = []

    def pass_on(signum: int, frame: FrameType | None) -> None:
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)
        elif handler != signal.SIG_IGN:  # the default action: terminate the process
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        state.draining = True
        if started or not (state.sessions or state.rest_active):
            pass_on(signum, frame)  # nothing to wait for, or a second signal: stop now
            return
        logger.info("received %s: draining before shutdown", signal.Signals(signum).name)
        loop.call_soon_threadsafe(lambda: started.append(loop.create_task(finish(signum, frame))))

    async def finish(signum: int, frame: FrameType | None) -> None:
        try:
            await drain(state, timeout_s)
        finally:
            pass_on(signum, frame)

    for sig in DRAIN_SIGNALS:
        signal.signal(sig, on_signal)
    return True
