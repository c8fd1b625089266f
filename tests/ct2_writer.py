"""Write a CTranslate2 (faster-whisper) Whisper folder from a transformers Whisper folder, for tests.

This is the layout CTranslate2's own Whisper converter produces (binary version 6): fused q|k|v and
k|v projections, gamma/beta layer norms, the output projection as an alias of the embeddings, and
quantized weights as int8 values with a float32 scale per output row. Written independently of
the server's reader, so a test can check the reader against it tensor by tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

_TYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}


def _string(value: str) -> bytes:
    raw = value.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _quantize(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and per-row scales, as CTranslate2 stores them (value = round(w * scale))."""
    peak = np.abs(weight).reshape(weight.shape[0], -1).max(axis=1)
    scale = (127.0 / np.where(peak == 0, 1.0, peak)).astype(np.float32)
    values = np.clip(np.round(weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))), -127, 127)
    return values.astype(np.int8), scale


def ct2_variables(state: dict[str, np.ndarray], config: dict[str, Any]) -> dict[str, np.ndarray]:
    """transformers state dict (float32 numpy) → CTranslate2 Whisper variable names."""
    out: dict[str, np.ndarray] = {}
    enc, dec = "model.encoder", "model.decoder"
    out["encoder/num_heads"] = np.array(config["encoder_attention_heads"], dtype=np.int32)
    out["decoder/num_heads"] = np.array(config["decoder_attention_heads"], dtype=np.int32)
    out["decoder/activation"] = np.array(3, dtype=np.int8)
    out["decoder/pre_norm"] = np.array(1, dtype=np.int8)
    for name in ("scale_embeddings", "alibi", "start_from_zero_embedding"):
        out[f"decoder/{name}"] = np.array(0, dtype=np.int8)
    for i in (1, 2):
        out[f"encoder/conv{i}/weight"] = state[f"{enc}.conv{i}.weight"]
        out[f"encoder/conv{i}/bias"] = state[f"{enc}.conv{i}.bias"]
    out["encoder/position_encodings/encodings"] = state[f"{enc}.embed_positions.weight"]
    out["encoder/layer_norm/gamma"] = state[f"{enc}.layer_norm.weight"]
    out["encoder/layer_norm/beta"] = state[f"{enc}.layer_norm.bias"]

    def norm(source: str, target: str) -> None:
        out[f"{target}/gamma"] = state[f"{source}.weight"]
        out[f"{target}/beta"] = state[f"{source}.bias"]

    def linear(source: str, target: str) -> None:
        out[f"{target}/weight"] = state[f"{source}.weight"]
        out[f"{target}/bias"] = state[f"{source}.bias"]

    def fused(sources: list[str], target: str) -> None:
        out[f"{target}/weight"] = np.concatenate([state[f"{s}.weight"] for s in sources])
        biases = [state.get(f"{s}.bias", np.zeros(state[f"{s}.weight"].shape[0], np.float32)) for s in sources]
        out[f"{target}/bias"] = np.concatenate(biases)

    for i in range(config["encoder_layers"]):
        s, t = f"{enc}.layers.{i}", f"encoder/layer_{i}"
        norm(f"{s}.self_attn_layer_norm", f"{t}/self_attention/layer_norm")
        fused([f"{s}.self_attn.{p}_proj" for p in "qkv"], f"{t}/self_attention/linear_0")
        linear(f"{s}.self_attn.out_proj", f"{t}/self_attention/linear_1")
        norm(f"{s}.final_layer_norm", f"{t}/ffn/layer_norm")
        linear(f"{s}.fc1", f"{t}/ffn/linear_0")
        linear(f"{s}.fc2", f"{t}/ffn/linear_1")
    out["decoder/embeddings/weight"] = state[f"{dec}.embed_tokens.weight"]
    out["decoder/position_encodings/encodings"] = state[f"{dec}.embed_positions.weight"]
    out["decoder/layer_norm/gamma"] = state[f"{dec}.layer_norm.weight"]
    out["decoder/layer_norm/beta"] = state[f"{dec}.layer_norm.bias"]
    for i in range(config["decoder_layers"]):
        s, t = f"{dec}.layers.{i}", f"decoder/layer_{i}"
        norm(f"{s}.self_attn_layer_norm", f"{t}/self_attention/layer_norm")
        fused([f"{s}.self_attn.{p}_proj" for p in "qkv"], f"{t}/self_attention/linear_0")
        linear(f"{s}.self_attn.out_proj", f"{t}/self_attention/linear_1")
        norm(f"{s}.encoder_attn_layer_norm", f"{t}/attention/layer_norm")
        linear(f"{s}.encoder_attn.q_proj", f"{t}/attention/linear_0")
        fused([f"{s}.encoder_attn.{p}_proj" for p in "kv"], f"{t}/attention/linear_1")
        linear(f"{s}.encoder_attn.out_proj", f"{t}/attention/linear_2")
        norm(f"{s}.final_layer_norm", f"{t}/ffn/layer_norm")
        linear(f"{s}.fc1", f"{t}/ffn/linear_0")
        linear(f"{s}.fc2", f"{t}/ffn/linear_1")
    return out


def write_model_bin(path: Path, variables: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Write model.bin; weights (2-D and up) in `dtype`. Returns each tensor as a reader must see it."""
    expected: dict[str, np.ndarray] = {}
    stored: dict[str, np.ndarray] = {}
    for name, value in variables.items():
        if value.ndim >= 2 and value.dtype == np.float32 and dtype == "int8" and name.endswith("/weight"):
            values, scale = _quantize(value)
            stored[name], stored[f"{name}_scale"] = values, scale
            expected[name] = values.astype(np.float32) / scale.reshape((-1,) + (1,) * (value.ndim - 1))
        elif value.dtype == np.float32 and dtype == "float16":
            stored[name] = value.astype(np.float16)
            expected[name] = stored[name].astype(np.float32)
        else:
            stored[name] = value
            expected[name] = value.astype(np.float32)
    body = [struct.pack("<I", 6), _string("WhisperSpec"), struct.pack("<I", 3), struct.pack("<I", len(stored))]
    for name, value in stored.items():
        body += [_string(name), struct.pack("<B", value.ndim), struct.pack(f"<{value.ndim}I", *value.shape)]
        raw = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes()
        body += [struct.pack("<B", _TYPE_IDS[str(value.dtype)]), struct.pack("<I", len(raw)), raw]
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    body.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        body += [_string(alias), _string(target)]
    path.write_bytes(b"".join(body))
    return expected


def write_ct2_folder(hf_folder: Path, out: Path, dtype: str = "float16") -> dict[str, np.ndarray]:
    """A faster-whisper folder holding the transformers model in `hf_folder`; returns the expected
    float32 value of each CTranslate2 weight (after the storage dtype's rounding)."""
    from safetensors.numpy import load_file

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((hf_folder / "config.json").read_text())
    generation = json.loads((hf_folder / "generation_config.json").read_text())
    state = {k: v.astype(np.float32) for k, v in load_file(str(hf_folder / "model.safetensors")).items()}
    expected = write_model_bin(out / "model.bin", ct2_variables(state, config), dtype)

    vocab: dict[str, int] = json.loads((hf_folder / "vocab.json").read_text())
    merges = [m for m in (hf_folder / "merges.txt").read_text().split("\n")[1:] if m]
    added: dict[str, int] = json.loads((hf_folder / "added_tokens.json").read_text())
    specials = {t: i for t, i in added.items() if not t[2:3].isdigit()}  # timestamps are not in tokenizer.json

    def by_id(item: tuple[str, int]) -> int:
        return item[1]

    tokenizer = {
        "version": "1.0",
        "added_tokens": [
            {"id": i, "content": t, "special": True} for t, i in sorted(specials.items(), key=lambda x: x[1])
        ],
        "model": {"type": "BPE", "vocab": vocab, "merges": merges},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    tokens = {i: t for t, i in {**vocab, **added}.items()}
    (out / "vocabulary.txt").write_text("\n".join(tokens[i] for i in range(len(tokens))) + "\n")
    (out / "config.json").write_text(
        json.dumps(
            {
                "alignment_heads": generation["alignment_heads"],
                "lang_ids": sorted(generation["lang_to_id"].values()),
                "suppress_ids": generation["suppress_tokens"],
                "suppress_ids_begin": generation["begin_suppress_tokens"],
            }
        )
    )
    return expected
