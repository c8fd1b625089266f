"""A client streaming faster than real time loses nothing, and the server buffers a bounded amount."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable

import pytest

from main import create_app
from real_time_audio.config import Settings
from tests.conftest import LiveServer, finals, pcm16, speech_like, stream_session

pytestmark = pytest.mark.slow  # integration: real servers, sessions or models


@pytest.mark.parametrize("keepalive", ["default", "tight"])
def test_fast_client_is_slowed_not_buffered(keepalive: str, make_settings: Callable[..., Settings]) -> None:
    """40 s of audio sent at once: unfinalized audio on the server never exceeds MAX_PENDING_AUDIO_S
    (plus the frame being read), every final arrives, and the recording is complete.

    With a tight server keepalive (pings every 0.5 s, 0.5 s to answer) the client's pongs are
    late, stuck behind audio the server is not reading yet; the connection must survive that."""
    settings = make_settings(max_pending_audio_s=5, segment_max_s=4, buffer_trim_s=4, partial_interval_ms=500)
    audio = pcm16(speech_like(77, 40.0))
    frame_bytes = 16000  # 0.5 s
    app = create_app(settings)
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for session in list(app.state.server.sessions.values()):
                if session.pipeline is not None:
                    peak[0] = max(peak[0], session.pipeline.policy.pending)
            time.sleep(0.002)

    config = {"ws_ping_interval": 0.5, "ws_ping_timeout": 0.5} if keepalive == "tight" else {}
    with LiveServer(app, **config) as server:
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            result = asyncio.run(stream_session(server.url, audio, frame_bytes=frame_bytes))
        finally:
            stop.set()
            watcher.join()
    messages = result["messages"]
    done = messages[-1]
    assert result["close_code"] == 1000 and done["status"] == "completed"
    assert done["recording"]["bytes"] == len(audio)
    assert done["recording"]["sha256"] == hashlib.sha256(audio).hexdigest()
    assert done["duration"] == 40.0
    spans = [(m["start"], m["end"]) for m in finals(messages)]
    assert len(spans) >= 40 / 4 - 1  # finals came at every segment cap, all along
    assert spans[-1][1] > 40.0 - settings.segment_max_s  # up to the last segment
    # The cap, the frame read when it was crossed, and slack for frames let through when the
    # transcriber takes longer than BACKPRESSURE_MAX_STALL_S (a slow machine).
    limit = int(settings.max_pending_audio_s * 16000) + 4 * frame_bytes // 2
    assert 0 < peak[0] <= limit, (peak[0], limit)
