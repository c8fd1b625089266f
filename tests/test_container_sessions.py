"""Container audio through real sessions: exact words, the original bytes on disk, bad input."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import soxr
from fastapi.testclient import TestClient

from real_time_audio.audio.files import encode
from real_time_audio.config import Settings
from tests.burst_speech import burst_app, speech_block
from tests.conftest import LiveServer, finals, is_status, receive_until
from tests.test_containers import JUNK, random_slices

pytestmark = pytest.mark.slow  # integration: real servers, sessions or models


def run_session(client: TestClient, url: str, slices: list[bytes], config: dict[str, Any] | None = None) -> list[Any]:
    with client.websocket_connect(url) as ws:
        messages = [ws.receive_json()]
        if config:
            ws.send_json({"type": "config", **config})
            messages.append(ws.receive_json())
        for piece in slices:
            ws.send_bytes(piece)
        ws.send_text("END")
        messages += receive_until(ws, is_status("completed"))
    return messages


@pytest.mark.parametrize("encoding", ["webm", "ogg", "mp4", "mp3", "flac", "wav"])
def test_container_speech_is_transcribed_exactly_and_kept_byte_for_byte(
    encoding: str, make_settings: Callable[..., Settings]
) -> None:
    """Burst speech encoded as a container and sent in random slices, the way MediaRecorder cuts its
    stream: the finals are exactly the spoken words, and the recording is the bytes as sent."""
    settings = make_settings(vad="silero", partial_interval_ms=300)
    audio, spoken = speech_block(seed=21, seconds=40.0)
    data = encode(audio, 16000, encoding)
    slices = random_slices(data, seed=len(encoding), largest=8000)
    with TestClient(burst_app(settings)) as client:
        messages = run_session(client, f"/ws/transcribe?encoding={encoding}", slices)
    assert messages[0]["config"]["encoding"] == encoding
    assert [m for m in messages if m["type"] == "error"] == []
    words = [w["word"] for m in finals(messages) for w in m["words"]]
    assert words == [w.text for w in spoken]
    completed = messages[-1]
    assert completed["recording"]["bytes"] == len(data)
    assert completed["recording"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert completed["recording"]["audio"] == f"/sessions/{completed['session_id']}/audio"  # a URL, no server path
    assert abs(completed["duration"] - 40.0) < 0.15
    folder = settings.audio_storage_dir / completed["session_id"]
    assert (folder / f"audio.{encoding}").read_bytes() == data
    meta = json.loads((folder / "session.json").read_text())
    assert meta["audio_file"] == f"audio.{encoding}" and meta["status"] == "completed"


def test_junk_gets_bad_audio_and_the_valid_stream_after_it_is_still_transcribed(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(vad="silero", partial_interval_ms=300)
    audio, spoken = speech_block(seed=5, seconds=20.0)
    data = encode(audio, 16000, "ogg")
    junk = JUNK[:3000]
    with TestClient(burst_app(settings)) as client:
        messages = run_session(client, "/ws/transcribe", [junk, *random_slices(data, 3)], config={"encoding": "ogg"})
    assert messages[1] == {"type": "status", "status": "configured", "config": messages[1]["config"]}
    errors = [m for m in messages if m["type"] == "error"]
    assert errors == [
        {
            "type": "error",
            "code": "bad_audio",
            "message": "the stream does not look like ogg: it should start with an Ogg page ('OggS'), got "
            + junk[:8].hex(" "),
        }
    ]
    assert [w["word"] for m in finals(messages) for w in m["words"]] == [w.text for w in spoken]
    completed = messages[-1]
    assert completed["recording"]["sha256"] == hashlib.sha256(junk + data).hexdigest()  # every byte, as received


def test_a_broken_tail_keeps_every_word_before_it(make_settings: Callable[..., Settings]) -> None:
    """An MP3 whose second half is garbage: bad_audio is reported and the first half's words all come out."""
    settings = make_settings(vad="silero", partial_interval_ms=300)
    audio, spoken = speech_block(seed=8, seconds=30.0)
    data = encode(audio, 16000, "mp3")
    cut = len(data) // 2
    cut_time = 30.0 * cut / len(data)  # constant bit rate: bytes are proportional to time
    with TestClient(burst_app(settings)) as client:
        messages = run_session(client, "/ws/transcribe?encoding=mp3", [*random_slices(data[:cut], 2), JUNK[:60000]])
    assert {m["code"] for m in messages if m["type"] == "error"} == {"bad_audio"}
    words = [w["word"] for m in finals(messages) for w in m["words"]]
    before = [w.text for w in spoken if w.end < cut_time - 1.0]
    assert words[: len(before)] == before
    assert messages[-1]["type"] == "status" and messages[-1]["status"] == "completed"


def test_wav_and_raw_pcm_give_the_same_words(make_settings: Callable[..., Settings]) -> None:
    """The same audio as a streamed WAV container and as raw 44.1 kHz stereo PCM."""
    settings = make_settings(vad="silero", partial_interval_ms=300)
    audio, spoken = speech_block(seed=13, seconds=20.0)
    stereo = np.repeat(audio[:, None], 2, axis=1)
    pcm = (soxr.resample(stereo, 16000, 44100) * 32767).astype("<i2").tobytes()
    with TestClient(burst_app(settings)) as client:
        as_wav = run_session(client, "/ws/transcribe?encoding=wav", random_slices(encode(audio, 16000, "wav"), 4))
        as_pcm = run_session(
            client,
            "/ws/transcribe?sample_rate=44100&channels=2",
            [pcm[i : i + 4 * 1000] for i in range(0, len(pcm), 4 * 1000)],
        )
    expected = [w.text for w in spoken]
    assert [w["word"] for m in finals(as_wav) for w in m["words"]] == expected
    assert [w["word"] for m in finals(as_pcm) for w in m["words"]] == expected


def test_a_client_vanishing_mid_stream_leaves_no_demuxer_behind(make_settings: Callable[..., Settings]) -> None:
    """Clients that drop their connection mid-stream (through a real uvicorn): every demuxer thread
    stops and every record is closed with all the bytes that arrived."""
    import asyncio
    import threading
    import time

    import websockets

    settings = make_settings(vad="silero", partial_interval_ms=300)
    data = encode(speech_block(seed=3, seconds=10.0)[0], 16000, "webm")
    half = data[: len(data) // 2]

    async def vanish(url: str) -> None:
        async with websockets.connect(url + "?encoding=webm") as ws:
            await ws.recv()
            for piece in random_slices(half, 1):
                await ws.send(piece)
            await asyncio.sleep(0.3)  # let the server take it all in, then drop the connection

    with LiveServer(burst_app(settings)) as server:

        async def three() -> None:
            await asyncio.wait_for(asyncio.gather(*(vanish(server.url) for _ in range(3))), 60)

        asyncio.run(three())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            any(t.name.startswith("demux-") for t in threading.enumerate())
            or len(list(settings.audio_storage_dir.glob("*/session.json"))) < 3
            or any('"active"' in p.read_text() for p in settings.audio_storage_dir.glob("*/session.json"))
        ):
            time.sleep(0.05)
        assert [t.name for t in threading.enumerate() if t.name.startswith("demux-")] == []
    sessions = [json.loads(p.read_text()) for p in settings.audio_storage_dir.glob("*/session.json")]
    assert sorted(s["status"] for s in sessions) == ["disconnected"] * 3
    assert all(s["bytes"] == len(half) and s["audio_file"] == "audio.webm" for s in sessions)
    assert all(s["sha256"] == hashlib.sha256(half).hexdigest() for s in sessions)
