"""Settings: defaults, sources, and start-up refusal of invalid values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from real_time_audio.config import Settings, SettingsError, load_settings
from tests.conftest import PROJECT_ROOT

NAMES = [
    "HOST",
    "PORT",
    "TRANSCRIPTION_MODEL_ID",
    "DEVICE",
    "TORCH_DTYPE",
    "QUANTIZATION",
    "AUDIO_STORAGE_DIR",
    "LOG_LEVEL",
    "BATCH_MAX_SIZE",
    "BATCH_WAIT_MS",
    "QUEUE_MAX_SIZE",
    "INFERENCE_WORKERS",
    "INFERENCE_THREADS",
    "PREEMPT_PARTIALS",
    "MAX_SESSIONS",
    "MAX_FRAME_BYTES",
    "IDLE_TIMEOUT_S",
    "PARTIAL_INTERVAL_MS",
    "PARTIAL_INTERVAL_MAX_MS",
]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here unless a test writes one


def test_every_documented_setting_exists_with_a_description() -> None:
    """Each operator-facing name is a field with a type, a default and a one-line description."""
    fields = Settings.model_fields
    for name in NAMES:
        field = fields[name.lower()]
        assert field.description, name
        assert "\n" not in field.description
        assert not field.is_required(), name


def test_defaults() -> None:
    """Defaults match the documentation."""
    settings = load_settings()
    assert settings.transcription_model_id == "openai/whisper-large-v3-turbo"
    assert (settings.device, settings.torch_dtype, settings.port) == ("auto", "auto", 8000)
    assert settings.audio_storage_dir == Path("audio_chunks")


def test_environment_overrides_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`.env` is read, and a real environment variable wins over it."""
    (tmp_path / ".env").write_text("BATCH_MAX_SIZE=4\nMAX_SESSIONS=7\nDEVICE=cuda:1\n")
    monkeypatch.setenv("MAX_SESSIONS", "9")
    settings = load_settings()
    assert (settings.batch_max_size, settings.max_sessions, settings.device) == (4, 9, "cuda:1")
    monkeypatch.setenv("MAX_SESSIONS", "auto")
    assert load_settings().max_sessions == "auto"
    monkeypatch.setenv("MAX_SESSIONS", "0")
    with pytest.raises(SettingsError, match="MAX_SESSIONS"):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("BATCH_MAX_SIZE", "0", "BATCH_MAX_SIZE='0': Input should be greater than or equal to 1"),
        ("DEVICE", "gpu", "DEVICE='gpu': must be auto, cpu, cuda or cuda:N"),
        ("PORT", "http", "PORT='http': Input should be a valid integer"),
        ("TORCH_DTYPE", "int8", "TORCH_DTYPE='int8': Input should be 'auto', 'float16', 'bfloat16' or 'float32'"),
        ("QUANTIZATION", "int4", "QUANTIZATION='int4': Input should be 'none' or 'int8'"),
        ("IDLE_TIMEOUT_S", "-1", "IDLE_TIMEOUT_S='-1': Input should be greater than 0"),
        ("MAX_FRAME_BYTES", str(64 * 1024 * 1024), "MAX_FRAME_BYTES='67108864'"),
    ],
)
def test_invalid_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    """An invalid value is refused with a message naming the variable and the problem."""
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert expected in str(info.value)


def test_queue_must_hold_a_job_per_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """A queue smaller than the session limit could force finals to wait unboundedly: refused."""
    monkeypatch.setenv("QUEUE_MAX_SIZE", "4")
    with pytest.raises(SettingsError, match=r"QUEUE_MAX_SIZE \(4\) must be at least MAX_SESSIONS \(32\)"):
        load_settings()


def test_server_start_fails_naming_the_variable(tmp_path: Path) -> None:
    """`uvicorn main:app` with a bad setting exits non-zero and says which variable is wrong."""
    env = {**os.environ, "BATCH_WAIT_MS": "soon", "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "main:app", "--port", "1"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "invalid configuration: BATCH_WAIT_MS='soon': Input should be a valid number" in result.stderr


def test_vad_padding_cannot_exceed_the_silence_that_ends_speech() -> None:
    """Speech starts at least VAD_SILENCE_MS after the utterance before it ended: a longer
    VAD_PAD_MS would put the end of that utterance into the next one's pre-roll."""
    with pytest.raises(SettingsError, match=r"VAD_PAD_MS \(600\) must not exceed VAD_SILENCE_MS \(500\)"):
        load_settings(vad_pad_ms=600, vad_silence_ms=500)


def test_vad_tail_is_bounded() -> None:
    """VAD_TAIL_MS: the final decode waits for it, so it is held to two seconds."""
    assert load_settings(vad_tail_ms=0).vad_tail_ms == 0
    with pytest.raises(SettingsError, match="VAD_TAIL_MS=2500: Input should be less than or equal to 2000"):
        load_settings(vad_tail_ms=2500)
    assert load_settings(vad="off").vad == "off"
