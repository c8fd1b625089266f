"""What people read, on real Whisper weights: the tiny.en model that `make install` brings (the
server's fallback model), converted by the server's own converter and cached between runs.

Speech comes from espeak-ng. Texts are compared after the normalisation below (lower case, no
punctuation, numbers as digits are not involved), word for word.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile
from fastapi import FastAPI

from real_time_audio.audio.files import encode
from real_time_audio.config import Settings
from rta_client.__main__ import main
from tests.conftest import LiveServer, needs_espeak, pcm16, stream_session

# Sentences tiny.en reads back word for word from espeak-ng's en-us voice (not every one does:
# "the quick brown fox" comes back as "the quick round fark stump").
SENTENCES = (
    "good morning everyone and welcome to the show",
    "it is raining in the city tonight",
    "we will meet at the station tomorrow morning",
    "the children are playing in the garden",
)
pytestmark = [pytest.mark.slow, needs_espeak]


def plain(text: str) -> str:
    """Lower case, punctuation dropped, single spaces: what is compared."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def joined_finals(messages: list[dict[str, Any]]) -> str:
    finals = [m for m in messages if m.get("type") == "transcription" and m["is_final"]]
    return " ".join(m["text"] for m in sorted(finals, key=lambda m: m["segment_id"]))


@pytest.fixture
def real_settings(make_settings: Callable[..., Settings], real_model_dir: Path) -> Settings:
    """The server's defaults (Silero VAD on, 1 s partials) with the real model."""
    return make_settings(transcription_model_id=str(real_model_dir), vad="silero", partial_interval_ms=1000)


@pytest.fixture
def real_server(real_settings: Settings) -> Iterator[LiveServer]:
    from main import create_app

    app: FastAPI = create_app(real_settings)
    with LiveServer(app) as server:
        yield server


def with_pauses(say: Callable[[str], np.ndarray], texts: tuple[str, ...], pause_s: float = 1.2) -> np.ndarray:
    silence = np.zeros(int(pause_s * 16000), dtype=np.float32)
    return np.concatenate([piece for text in texts for piece in (silence, say(text))] + [silence])


def test_concurrent_sessions_each_get_their_own_sentence(
    real_server: LiveServer, say: Callable[[str], np.ndarray]
) -> None:
    """Four sessions at once, each speaking its own sentence: each reads back exactly its own words."""

    async def run_all() -> list[dict[str, Any]]:
        return await asyncio.gather(
            *(
                stream_session(real_server.url, pcm16(with_pauses(say, (text,))), frame_bytes=3200, delay_s=0.02)
                for text in SENTENCES
            )
        )

    results = asyncio.run(run_all())
    for text, result in zip(SENTENCES, results, strict=True):
        messages = result["messages"]
        assert result["close_code"] == 1000
        assert plain(joined_finals(messages)) == text
        completed = messages[-1]
        assert completed["status"] == "completed" and plain(completed["text"]) == text
        assert not [m for m in messages if m["type"] == "error"]


def test_a_sentence_over_pauses_reads_as_one_text(real_server: LiveServer, say: Callable[[str], np.ndarray]) -> None:
    """Two sentences with a pause between them: the finals hold exactly their words, in order, and start
    with a capital letter as a transcript does."""
    audio = with_pauses(say, SENTENCES[:2])
    result = asyncio.run(stream_session(real_server.url, pcm16(audio), frame_bytes=3200, delay_s=0.02))
    text = joined_finals(result["messages"])
    assert plain(text) == f"{SENTENCES[0]} {SENTENCES[1]}"
    assert text[0] == "G"


def test_a_second_voice_after_a_pause_is_not_lost(real_server: LiveServer, say: Callable[..., np.ndarray]) -> None:
    """A sentence, 1.4 s of silence, and another voice: given the first sentence as its prefix,
    tiny.en ends its text at once and hears none of the second one, so the server decodes it again
    on its own. Both sentences are in the finals, word for word."""
    first, second = SENTENCES[1], SENTENCES[3]
    pause = np.zeros(int(1.4 * 16000), dtype=np.float32)
    audio = np.concatenate([pause[:8000], say(f"{first}.", "en-us"), pause, say(f"{second}.", "en-us+f3"), pause])
    result = asyncio.run(stream_session(real_server.url, pcm16(audio), frame_bytes=3200, delay_s=0.02))
    assert result["close_code"] == 1000
    assert plain(joined_finals(result["messages"])) == f"{first} {second}"
    metrics = httpx.get(f"http://127.0.0.1:{real_server.port}/metrics", timeout=10).text
    decoded_again = re.search(r"^rta_speech_decoded_again_total (\S+)$", metrics, re.MULTILINE)
    assert decoded_again is not None and float(decoded_again.group(1)) >= 1


@pytest.mark.parametrize("noise", ["silence", "white", "pink", "hum"])
def test_silence_and_noise_give_no_words(
    noise: str, real_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """30 s of digital silence, white noise at -40 dBFS, pink noise or a 50 Hz hum give no text at all."""
    rng = np.random.default_rng(5)
    n = 30 * 16000
    if noise == "silence":
        audio = np.zeros(n, dtype=np.float32)
    elif noise == "white":
        audio = rng.standard_normal(n) * 10 ** (-40 / 20)
    elif noise == "pink":
        spectrum = np.fft.rfft(rng.standard_normal(n))
        spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
        pink = np.fft.irfft(spectrum, n)
        audio = pink / np.abs(pink).max() * 0.1
    else:
        audio = 0.1 * np.sin(2 * np.pi * 50 * np.arange(n) / 16000)
    source = tmp_path / f"{noise}.wav"
    soundfile.write(source, audio.astype(np.float32), 16000, subtype="PCM_16")
    for name in ("TRANSCRIPTION_MODEL_ID", "VAD", "DEVICE", "WARMUP"):
        monkeypatch.setenv(name, str(getattr(real_settings, name.lower())))
    out = tmp_path / "out.json"
    assert main(["stt", str(source), "-o", str(out)]) == 0
    document = json.loads(out.read_text())
    assert (document["text"], document["segments"]) == ("", [])


def test_stream_command_prints_the_real_words(
    real_server: LiveServer, say: Callable[[str], np.ndarray], tmp_path: Path
) -> None:
    """`rta-client stream` of a WebM file gives the sentences, and the recording's SHA-256 matches."""
    source = tmp_path / "speech.webm"
    source.write_bytes(encode(with_pauses(say, SENTENCES[2:]), 16000, "webm"))
    out = tmp_path / "transcript.json"
    assert main(["stream", str(source), "--uri", real_server.url, "-q", "-o", str(out)]) == 0
    document = json.loads(out.read_text())
    assert plain(document["text"]) == f"{SENTENCES[2]} {SENTENCES[3]}"
    assert document["session"]["recording"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()


def test_stt_command_prints_the_real_words(
    real_settings: Settings, say: Callable[[str], np.ndarray], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`rta-client stt` (no server) reads an MP3 of two sentences back word for word."""
    source = tmp_path / "speech.mp3"
    source.write_bytes(encode(with_pauses(say, SENTENCES[:2]), 16000, "mp3"))
    for name in ("TRANSCRIPTION_MODEL_ID", "VAD", "DEVICE"):
        monkeypatch.setenv(name, str(getattr(real_settings, name.lower())))
    out = tmp_path / "speech.txt"
    assert main(["stt", str(source), "-o", str(out)]) == 0
    assert plain(out.read_text()) == f"{SENTENCES[0]} {SENTENCES[1]}"


def test_session_record_keeps_the_real_transcript(
    real_server: LiveServer, real_settings: Settings, say: Callable[[str], np.ndarray]
) -> None:
    """transcript.jsonl on disk holds the same real words the client read."""
    result = asyncio.run(
        stream_session(real_server.url, pcm16(with_pauses(say, SENTENCES[3:])), frame_bytes=3200, delay_s=0.01)
    )
    folders = list(real_settings.audio_storage_dir.iterdir())
    assert len(folders) == 1
    lines = [json.loads(line) for line in (folders[0] / "transcript.jsonl").read_text().splitlines()]
    assert plain(" ".join(line["text"] for line in lines)) == SENTENCES[3] == plain(joined_finals(result["messages"]))


def test_int8_quantization_replaces_every_linear_layer_and_keeps_the_words(
    real_model_dir: Path, say: Callable[[str], np.ndarray]
) -> None:
    """QUANTIZATION=int8 on the CPU: every linear layer (encoder, decoder, vocabulary projection) runs
    in int8, and the real model still reads each sentence of a batch word for word."""
    import torch

    from real_time_audio.config import load_settings
    from real_time_audio.service import TranscriptionRequest
    from real_time_audio.whisper.backend import WhisperBackend

    float32 = WhisperBackend.load(load_settings(transcription_model_id=str(real_model_dir), warmup=False))
    int8 = WhisperBackend.load(
        load_settings(transcription_model_id=str(real_model_dir), warmup=False, quantization="int8")
    )
    linear = [name for name, m in float32.model.named_modules() if isinstance(m, torch.nn.Linear)]
    # Per encoder layer q, k, v, out, fc1, fc2; per decoder layer those and the cross-attention's four; proj_out.
    assert len(linear) == 4 * 6 + 4 * 10 + 1
    replaced = dict(int8.model.named_modules())
    assert not [name for name in linear if isinstance(replaced[name], torch.nn.Linear)]
    assert replaced["proj_out"].weight().dtype == torch.qint8
    requests = [TranscriptionRequest(audio=say(text), language="en") for text in SENTENCES]
    texts = [plain(result.text) for result in int8.transcribe_batch(requests)]
    assert texts == list(SENTENCES)
    assert [plain(result.text) for result in float32.transcribe_batch(requests)] == texts
