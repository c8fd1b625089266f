"""A full disk: the session is told once, transcription goes on, the server keeps serving.

Uses a real, tiny tmpfs as AUDIO_STORAGE_DIR (mounting needs root, as `make test` runs in CI;
elsewhere the test is skipped).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import soundfile
from fastapi.testclient import TestClient

from main import create_app
from real_time_audio.config import Settings
from tests.conftest import frames, pcm16, receive_until, speech_like
from tests.test_routes import expect_close

pytestmark = pytest.mark.slow  # integration: real servers, sessions or models

SIZE = 512 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def run_session(client: TestClient, audio: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Stream `audio` then END; returns (errors, all messages)."""
    with client.websocket_connect("/ws/transcribe?interim_results=false") as ws:
        messages = [ws.receive_json()]
        for chunk in frames(audio, 16000):
            ws.send_bytes(chunk)
        ws.send_text("END")
        messages += receive_until(ws, lambda m: m.get("status") == "completed")
        expect_close(ws, 1000)
    return [m for m in messages if m["type"] == "error"], messages


def test_full_disk_reports_once_and_transcription_goes_on(
    small_disk: Path, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    audio = pcm16(speech_like(91, 8.0))  # 256 KB; the disk has room for about 100 KB of it
    with TestClient(create_app(make_settings(audio_storage_dir=tmp_path / "roomy"))) as client:
        _, reference = run_session(client, audio)
    expected_text = reference[-1]["text"]

    settings = make_settings(audio_storage_dir=small_disk)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (SIZE - 128 * 1024))
    with TestClient(create_app(settings)) as client:
        errors, messages = run_session(client, audio)
        assert [e["code"] for e in errors] == ["storage_full"]
        assert "No space left on device" in errors[0]["message"]
        assert "transcription goes on" in errors[0]["message"]
        done = messages[-1]
        assert done["text"] == expected_text != ""
        assert done["recording"]["bytes"] == len(audio)
        assert done["recording"]["sha256"] == hashlib.sha256(audio).hexdigest()

        # On disk: a valid WAV holding a prefix of the audio, and a session.json that says what happened.
        folder = small_disk / done["session_id"]
        meta = json.loads((folder / "session.json").read_text())
        assert meta["status"] == "completed"
        assert meta["storage_error"].startswith("No space left on device (from byte ")
        stored, rate = soundfile.read(folder / "audio.wav", dtype="int16")
        assert rate == 16000 and 0 < len(stored) * 2 < len(audio)
        assert stored.tobytes() == audio[: len(stored) * 2]

        # The next session on the still-full disk is told at once and is served all the same.
        errors, messages = run_session(client, audio)
        assert [e["code"] for e in errors] == ["storage_full"]
        assert messages[-1]["text"] == expected_text

        # Space comes back: sessions are recorded normally again, in the same process.
        filler.unlink()
        errors, messages = run_session(client, audio)
        assert errors == []
        folder = small_disk / messages[-1]["session_id"]
        assert (folder / "audio.wav").read_bytes()[44:] == audio
        assert client.get("/ready").status_code == 200
