"""The page at `/` in a real headless Chromium, with a fake microphone playing a speech file.

Chromium and chromedriver come from Debian (`make test` installs them when run as root); the test
is skipped when they are missing. Each run leaves a screenshot in `test-artifacts/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from real_time_audio.config import Settings
from tests.burst_speech import burst_app, speech_block
from tests.conftest import LiveServer, needs_espeak, seconds

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SEED = 17
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="chromium and chromium-driver are not installed (make test installs them as root)",
    ),
]


@pytest.fixture(scope="module")
def speech_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Burst speech for the fake microphone (Chromium loops it)."""
    audio, _ = speech_block(seed=SEED, seconds=30.0)
    path = tmp_path_factory.mktemp("browser") / "speech.wav"
    soundfile.write(path, audio, 16000, subtype="PCM_16")
    return path


@pytest.fixture
def browser(speech_file: Path) -> Iterator[object]:
    with chromium(speech_file) as driver:
        yield driver


@contextlib.contextmanager
def chromium(speech_file: Path) -> Iterator[object]:
    """Headless Chromium whose fake microphone plays `speech_file` in a loop."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1100,800",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={speech_file}",
        "--autoplay-policy=no-user-gesture-required",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: object, condition: Callable[[object], object], timeout_s: float) -> object:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds(timeout_s), poll_frequency=0.2).until(condition)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("capture", "encoding", "audio_file"), [("", "pcm_s16le", "audio.wav"), ("recorder", "webm", "audio.webm")]
)
def test_page_records_the_microphone_and_shows_finals(
    capture: str,
    encoding: str,
    audio_file: str,
    browser: object,
    make_settings: Callable[..., Settings],
) -> None:
    from selenium.webdriver.common.by import By

    settings = make_settings(vad="silero", partial_interval_ms=300)
    with LiveServer(burst_app(settings)) as server:
        driver = browser
        driver.get(f"http://127.0.0.1:{server.port}/" + (f"?capture={capture}" if capture else ""))  # type: ignore[attr-defined]
        find = driver.find_element  # type: ignore[attr-defined]
        assert find(By.ID, "connection").text == "idle"
        find(By.ID, "start").click()
        wait_for(driver, lambda d: find(By.ID, "connection").text == "live", 30)
        # Utterances end and become finals while the microphone runs.
        wait_for(driver, lambda d: len(find(By.ID, "finals").find_elements(By.CSS_SELECTOR, "span.final")) >= 2, 60)
        find(By.ID, "stop").click()
        wait_for(driver, lambda d: "everything said so far is final" in find(By.ID, "status").text, 30)
        ARTIFACTS.mkdir(exist_ok=True)
        screenshot = ARTIFACTS / f"browser-page-{encoding}.png"
        driver.save_screenshot(str(screenshot))  # type: ignore[attr-defined]
        finals_text = find(By.ID, "finals").text
        find(By.ID, "finish").click()
        wait_for(driver, lambda d: find(By.ID, "recording").text.startswith("completed:"), 60)
        recording_text = find(By.ID, "recording").text
        assert find(By.ID, "connection").text == "completed"

    assert screenshot.stat().st_size > 10_000
    # The fake microphone plays the file from its start: the finals are its first words, in order
    # (the last one may be cut short by Stop, and then comes out as the model's guess).
    words = finals_text.split()
    spoken = [w.text for w in speech_block(seed=SEED, seconds=30.0)[1]]
    assert len(words) >= 3 and words[:-1] == spoken[: len(words) - 1], finals_text
    assert words[-1].split("~")[0] == spoken[len(words) - 1]
    match = re.search(r"(\d+) bytes, sha256 ([0-9a-f]{64})", recording_text)
    assert match, recording_text
    sessions = list(settings.audio_storage_dir.iterdir())
    assert len(sessions) == 1
    meta = json.loads((sessions[0] / "session.json").read_text())
    assert meta["status"] == "completed" and meta["config"]["encoding"] == encoding
    assert meta["audio_file"] == audio_file and meta["bytes"] == int(match.group(1)) > 0
    stored = (sessions[0] / audio_file).read_bytes()
    payload = stored[44:] if audio_file == "audio.wav" else stored  # PCM sits behind a 44-byte header
    assert hashlib.sha256(payload).hexdigest() == meta["sha256"] == match.group(2)
    transcript = [json.loads(line) for line in (sessions[0] / "transcript.jsonl").read_text().splitlines()]
    assert " ".join(t["text"] for t in transcript if t["text"]).split()[: len(words)] == words
    if audio_file == "audio.wav":  # the page sent 16 kHz mono PCM16 that is audibly the speech file
        pcm = np.frombuffer(payload, dtype="<i2").astype(np.float32) / 32768
        assert float(np.sqrt(np.mean(pcm**2))) > 0.02


@needs_espeak
def test_page_shows_the_real_words_spoken_into_the_microphone(
    tmp_path: Path, make_settings: Callable[..., Settings], real_model_dir: Path, say: Callable[[str], np.ndarray]
) -> None:
    """With the real tiny.en model, the finals on the page are the words of the speech the microphone plays.

    The server requires a token: the page takes it from the address (`#token=`), removes it from
    there, and sends it as a WebSocket subprotocol, so the session opens and belongs to that token."""
    from selenium.webdriver.common.by import By

    from main import create_app

    sentences = ("good morning everyone and welcome to the show", "we will meet at the station tomorrow morning")
    pause = np.zeros(16000, dtype=np.float32)
    audio = np.concatenate([pause, say(sentences[0]), pause, say(sentences[1]), pause, pause])
    speech = tmp_path / "sentences.wav"
    soundfile.write(speech, audio, 16000, subtype="PCM_16")
    expected = " ".join(sentences)
    settings = make_settings(
        transcription_model_id=str(real_model_dir), vad="silero", partial_interval_ms=1000, api_tokens="page-token-7"
    )

    def plain(text: str) -> str:
        return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())

    with LiveServer(create_app(settings)) as server, chromium(speech) as driver:
        find = driver.find_element  # type: ignore[attr-defined]
        driver.get(f"http://127.0.0.1:{server.port}/#token=page-token-7")  # type: ignore[attr-defined]
        # The page's module script takes the token out of the address; on a loaded machine that may
        # happen after `get` returns.
        wait_for(driver, lambda d: "token" not in d.current_url, 15)
        find(By.ID, "start").click()
        wait_for(driver, lambda d: find(By.ID, "connection").text == "live", 30)
        # Both sentences, word for word, become finals while the microphone runs.
        wait_for(driver, lambda d: plain(find(By.ID, "finals").text).startswith(expected), 90)
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "browser-page-real-model.png"))  # type: ignore[attr-defined]
        finals_text = find(By.ID, "finals").text
        find(By.ID, "finish").click()
        wait_for(driver, lambda d: find(By.ID, "recording").text.startswith("completed:"), 60)
    assert plain(finals_text).startswith(expected), finals_text
    assert finals_text.startswith("Good morning")
    (record,) = settings.audio_storage_dir.glob("*/session.json")
    owner = json.loads(record.read_text())["owner"]
    assert owner == hashlib.sha256(b"page-token-7").hexdigest()
