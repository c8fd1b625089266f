"""faster-whisper (CTranslate2) folders: exact conversion, verification, refusal of damaged folders, the cache."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from real_time_audio.whisper.ct2 import Ct2FormatError, read_model_bin, repair_merges
from real_time_audio.whisper.source import MANIFEST, ModelLoadError, prepare_ct2_folder
from tests.ct2_writer import ct2_variables, write_ct2_folder


def converted_state(folder: Path) -> dict[str, np.ndarray]:
    return {name: value.astype(np.float32) for name, value in load_file(str(folder / "model.safetensors")).items()}


@pytest.fixture(scope="module")
def hf_state(checkpoint_dir: Path) -> dict[str, np.ndarray]:
    return converted_state(checkpoint_dir)


@pytest.fixture(scope="module")
def hf_config(checkpoint_dir: Path) -> dict[str, object]:
    return json.loads((checkpoint_dir / "config.json").read_text())  # type: ignore[no-any-return]


def test_float32_folder_converts_to_the_same_tensors(
    checkpoint_dir: Path, hf_state: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """A float32 faster-whisper folder gives back every tensor of the model it was made from, bit for bit."""
    write_ct2_folder(checkpoint_dir, tmp_path / "ct2", "float32")
    out = prepare_ct2_folder(tmp_path / "ct2", tmp_path / "cache")
    state = converted_state(out)
    assert sorted(state) == sorted(hf_state)
    for name, value in hf_state.items():
        assert np.array_equal(state[name], value), name


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_stored_weights_convert_to_exactly_what_the_folder_holds(
    checkpoint_dir: Path, hf_config: dict[str, object], dtype: str, tmp_path: Path
) -> None:
    """float16 weights are widened exactly and int8 weights dequantized as value / row scale, tensor by tensor."""
    expected = write_ct2_folder(checkpoint_dir, tmp_path / "ct2", dtype)
    out = prepare_ct2_folder(tmp_path / "ct2", tmp_path / "cache")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["stored_as"] == ("float16" if dtype == "float16" else "float32")
    again = ct2_variables(converted_state(out), hf_config)  # the converted model, in CTranslate2's names
    weights = [name for name, value in expected.items() if value.ndim >= 1]
    assert len(weights) == len([n for n in again if again[n].ndim >= 1])
    for name in weights:
        assert np.array_equal(again[name], expected[name]), name


def test_generation_config_and_tokenizer_come_from_the_folder(checkpoint_dir: Path, tmp_path: Path) -> None:
    """Alignment heads, suppressed tokens, languages and the tokenizer (timestamps included) match the source."""
    from transformers import GenerationConfig, WhisperTokenizer

    write_ct2_folder(checkpoint_dir, tmp_path / "ct2")
    out = prepare_ct2_folder(tmp_path / "ct2", tmp_path / "cache")
    source = GenerationConfig.from_pretrained(checkpoint_dir)
    converted = GenerationConfig.from_pretrained(out)
    for field in ("alignment_heads", "suppress_tokens", "begin_suppress_tokens", "lang_to_id", "task_to_id"):
        assert getattr(converted, field) == getattr(source, field), field
    assert converted.no_timestamps_token_id == source.no_timestamps_token_id
    assert converted.prev_sot_token_id == source.prev_sot_token_id
    assert converted.is_multilingual is True
    original, made = WhisperTokenizer.from_pretrained(checkpoint_dir), WhisperTokenizer.from_pretrained(out)
    assert len(made) == len(original)
    text = " ba ke mi no su"
    assert made.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False)
    assert made.convert_tokens_to_ids("<|1.00|>") == original.convert_tokens_to_ids("<|1.00|>")
    assert made.all_special_ids[-1] == source.no_timestamps_token_id


def test_a_model_bin_in_parts_reads_like_the_whole(checkpoint_dir: Path, tmp_path: Path) -> None:
    """model.bin.part1 + part2 read exactly like the one file."""
    write_ct2_folder(checkpoint_dir, tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "parts")
    data = (tmp_path / "parts" / "model.bin").read_bytes()
    (tmp_path / "parts" / "model.bin").unlink()
    (tmp_path / "parts" / "model.bin.part1").write_bytes(data[: len(data) // 3])
    (tmp_path / "parts" / "model.bin.part2").write_bytes(data[len(data) // 3 :])
    whole = converted_state(prepare_ct2_folder(tmp_path / "whole", tmp_path / "cache"))
    parts = converted_state(prepare_ct2_folder(tmp_path / "parts", tmp_path / "cache"))
    assert all(np.array_equal(whole[name], parts[name]) for name in whole)


def test_repair_merges_restores_a_lost_first_merge() -> None:
    """A BPE whose merges lost one (as the released multilingual tokenizer.json did) gets it back, in id order."""
    symbols = [chr(c) for c in range(256)]
    symbols[32] = "Ġ"  # byte-level BPE writes the space byte as Ġ
    vocab = {symbol: i for i, symbol in enumerate(symbols)} | {"Ġt": 256, "he": 257, "Ġthe": 258}
    assert repair_merges(vocab, ["h e", "Ġt he"]) == ["Ġ t", "h e", "Ġt he"]
    assert repair_merges(vocab, ["Ġ t", "h e", "Ġt he"]) == ["Ġ t", "h e", "Ġt he"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "model.bin is truncated: "),
        ("append", "model.bin has 3 bytes left over"),
        ("no-tokenizer", "tokenizer.json is missing or unreadable"),
        ("vocabulary", "vocabulary.txt disagrees with tokenizer.json at ids [5]"),
        ("missing-part", "model.bin parts [2] are missing (found [1, 3])"),
    ],
)
def test_a_damaged_folder_is_refused_with_a_clear_message(
    checkpoint_dir: Path, tmp_path: Path, damage: str, message: str
) -> None:
    """Truncated, padded, incomplete or inconsistent folders are refused, saying what is wrong; nothing is cached."""
    folder = tmp_path / "ct2"
    write_ct2_folder(checkpoint_dir, folder)
    model_bin = folder / "model.bin"
    if damage == "truncate":
        model_bin.write_bytes(model_bin.read_bytes()[:-1000])
    elif damage == "append":
        model_bin.write_bytes(model_bin.read_bytes() + b"xyz")
    elif damage == "no-tokenizer":
        (folder / "tokenizer.json").unlink()
    elif damage == "vocabulary":
        lines = (folder / "vocabulary.txt").read_text().split("\n")
        lines[5] = "wrong"
        (folder / "vocabulary.txt").write_text("\n".join(lines))
    else:
        data = model_bin.read_bytes()
        model_bin.unlink()
        (folder / "model.bin.part1").write_bytes(data[:100])
        (folder / "model.bin.part3").write_bytes(data[100:])
    with pytest.raises(ModelLoadError) as error:
        prepare_ct2_folder(folder, tmp_path / "cache")
    assert f"{folder} is not a usable faster-whisper (CTranslate2) Whisper folder: " in str(error.value)
    assert message in str(error.value)
    cache = tmp_path / "cache"
    assert not cache.exists() or [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_reader_rejects_an_unknown_binary_version(tmp_path: Path) -> None:
    """A model.bin from an unknown CTranslate2 version is named as such."""
    (tmp_path / "model.bin").write_bytes((9).to_bytes(4, "little"))
    with pytest.raises(Ct2FormatError, match="unknown binary version 9"):
        read_model_bin([tmp_path / "model.bin"])


def test_the_cache_is_reused_and_a_damaged_copy_redone(
    checkpoint_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A second start reuses the conversion; a damaged cached file or a changed source makes it convert again."""
    caplog.set_level(logging.INFO, logger="real_time_audio.whisper.source")
    write_ct2_folder(checkpoint_dir, tmp_path / "ct2")
    first = prepare_ct2_folder(tmp_path / "ct2", tmp_path / "cache")
    converted_at = json.loads((first / MANIFEST).read_text())["converted_at"]
    written = (first / "model.safetensors").stat().st_mtime_ns
    assert prepare_ct2_folder(tmp_path / "ct2", tmp_path / "cache") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == written
    assert "using the converted model cached in" in caplog.text

    weights = first / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    caplog.clear()
    assert prepare_ct2_folder(tmp_path / "ct2", tmp_path / "cache") == first
    assert "the cached conversion has a damaged model.safetensors" in caplog.text
    assert converted_state(first).keys() == converted_state(checkpoint_dir).keys()

    source = tmp_path / "ct2" / "model.bin"
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    caplog.clear()
    prepare_ct2_folder(tmp_path / "ct2", tmp_path / "cache")
    assert "was made from files that have changed since" in caplog.text
    assert json.loads((first / MANIFEST).read_text())["converted_at"] >= converted_at


def test_the_server_serves_a_faster_whisper_folder(checkpoint_dir: Path, tmp_path: Path) -> None:
    """TRANSCRIPTION_MODEL_ID naming a faster-whisper folder serves it under that name."""
    from fastapi.testclient import TestClient

    from main import create_app
    from real_time_audio.config import load_settings

    folder = tmp_path / "faster-whisper-micro"
    write_ct2_folder(checkpoint_dir, folder, "int8")
    settings = load_settings(
        transcription_model_id=str(folder),
        model_cache_dir=tmp_path / "cache",
        audio_storage_dir=tmp_path / "audio",
        warmup=False,
        vad="off",
    )
    with TestClient(create_app(settings)) as client:
        ready = client.get("/ready").json()
        assert ready == {"status": "ready", "model": str(folder), "device": "cpu", "sessions": 0, "max_sessions": 32}
        with client.websocket_connect("/ws/transcribe") as ws:
            connected = ws.receive_json()
            assert (connected["model"], connected["device"]) == (str(folder), "cpu")
