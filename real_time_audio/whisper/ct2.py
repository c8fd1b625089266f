"""faster-whisper (CTranslate2) Whisper folders, turned into Hugging Face transformers folders.

A CTranslate2 Whisper folder holds `model.bin` (one file, or `model.bin.part1`, `.part2` … to be
joined in order), `config.json` (alignment heads, language ids, suppressed tokens),
`tokenizer.json` and `vocabulary.txt`. The conversion is exact: float16 and bfloat16 weights are
widened losslessly, int8/int16 weights are dequantized the way CTranslate2 itself does
(value / scale), and every tensor is compared with its source after the result is written.

The layout inverted here is CTranslate2's Whisper spec: fused q|k|v self-attention projections
(`linear_0`), fused k|v cross-attention projections (`linear_1`), layer norms as gamma/beta, and
a decoder output projection that released checkpoints alias to the token embeddings.

This module needs numpy only: it reads and maps. Writing the transformers folder (and checking
that transformers loads it) is `real_time_audio.whisper.backend.write_transformers_folder`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.typing import NDArray

CONVERTER_VERSION = 1  # bump when the output of a conversion changes; cached folders are then redone
MODEL_BIN = "model.bin"
TIMESTAMP_STEP_S = 0.02
MULTILINGUAL_VOCAB = 51865  # Whisper's multilingual vocabularies have at least this many tokens

# CTranslate2's data type ids (binary version 4 and later) → numpy type
_DTYPES: dict[int, str] = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
# before version 4 the file gives the item size instead of a type id
_ITEMSIZE_DTYPES: dict[int, str] = {4: "float32", 2: "int16", 1: "int8"}
_REQUIRED_SPECIALS = (
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|notimestamps|>",
)
_NO_SPEECH = ("<|nocaptions|>", "<|nospeech|>")  # the no-speech token: named one way before large-v3, the other after
# Decoder flags for which transformers' Whisper computes the same function as CTranslate2
_STANDARD_DECODER = {
    "decoder/activation": 3,  # GELU
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/alibi": 0,
    "decoder/alibi_use_positive_positions": 0,
    "decoder/scale_alibi": 0,
    "decoder/start_from_zero_embedding": 0,
}
# Scalars CTranslate2 stores that have no tensor in transformers (the alignment_* pair belongs to
# CTranslate2's guided alignment, not to Whisper's word timing).
_SETTINGS = ("encoder/num_heads", "decoder/num_heads", "decoder/alignment_heads", "decoder/alignment_layer")


class Ct2FormatError(ValueError):
    """The folder is not a complete, well-formed CTranslate2 Whisper model; the message says where."""


# ---------------------------------------------------------------------------------------------
# Finding and reading the folder


def model_bin_parts(folder: Path) -> list[Path]:
    """`model.bin`, or its parts `model.bin.part1` … in numeric order; empty when there is neither."""
    whole = folder / MODEL_BIN
    if whole.is_file():
        return [whole]
    parts: dict[int, Path] = {}
    for path in folder.glob(f"{MODEL_BIN}.part*"):
        number = path.name.removeprefix(f"{MODEL_BIN}.part")
        if number.isdigit():
            parts[int(number)] = path
    if parts and sorted(parts) != list(range(1, len(parts) + 1)):
        missing = sorted(set(range(1, max(parts) + 1)) - set(parts))
        raise Ct2FormatError(f"{folder}: model.bin parts {missing} are missing (found {sorted(parts)})")
    return [parts[n] for n in sorted(parts)]


def is_ct2_folder(folder: Path) -> bool:
    """A folder that holds a CTranslate2 model (and no transformers weights of its own)."""
    if not folder.is_dir() or any((folder / name).exists() for name in ("model.safetensors", "pytorch_model.bin")):
        return False
    try:
        return bool(model_bin_parts(folder))
    except Ct2FormatError:
        return True  # it is one, just incomplete: the conversion will say what is missing


@dataclass(slots=True)
class Ct2Model:
    """The variables of a model.bin by name, with CTranslate2's aliases."""

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, NDArray[Any]]
    aliases: dict[str, str]

    def __contains__(self, name: str) -> bool:
        return name in self.variables or name in self.aliases

    def raw(self, name: str) -> NDArray[Any]:
        return self.variables[self.aliases.get(name, name)]

    def scalar(self, name: str, default: int | None = None) -> int | None:
        if name not in self:
            return default
        return int(self.raw(name).reshape(()).item())


class _JoinedFile:
    """Sequential reads across the parts of a split file, with the position for error messages."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.size = sum(p.stat().st_size for p in paths)
        self.position = 0
        self._files: Iterator[Path] = iter(paths)
        self._current: BinaryIO | None = None

    def read(self, count: int) -> bytes:
        if self.position + count > self.size:
            raise Ct2FormatError(
                f"model.bin is truncated: {count} bytes wanted at offset {self.position}, it has {self.size}"
            )
        chunks: list[bytes] = []
        wanted = count
        while wanted:
            if self._current is None:
                self._current = open(next(self._files), "rb")  # noqa: SIM115  # closed when exhausted
            chunk = self._current.read(wanted)
            if not chunk:
                self._current.close()
                self._current = None
                continue
            chunks.append(chunk)
            wanted -= len(chunk)
        self.position += count
        return b"".join(chunks)

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None


def read_model_bin(paths: list[Path]) -> Ct2Model:
    """Parse a model.bin (binary versions 1-6), checking every size and that nothing is left over."""
    if not paths:
        raise Ct2FormatError("no model.bin")
    source = _JoinedFile(paths)
    try:
        return _parse(source)
    finally:
        source.close()


def _parse(source: _JoinedFile) -> Ct2Model:
    def number(fmt: str) -> int:
        return int(struct.unpack(fmt, source.read(struct.calcsize(fmt)))[0])

    def string() -> str:
        raw = source.read(number("<H"))
        if not raw.endswith(b"\0"):
            raise Ct2FormatError(f"model.bin: unterminated string before offset {source.position}")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise Ct2FormatError(f"model.bin: a name before offset {source.position} is not UTF-8") from None

    version = number("<I")
    if not 1 <= version <= 6:
        raise Ct2FormatError(f"model.bin: unknown binary version {version} (CTranslate2 writes 1-6)")
    spec, revision = (string(), number("<I")) if version >= 2 else ("", 1)
    variables: dict[str, NDArray[Any]] = {}
    for _ in range(number("<I")):
        name = string()
        rank = number("<B")
        shape = struct.unpack(f"<{rank}I", source.read(4 * rank)) if rank else ()
        count = int(np.prod(shape, dtype=np.int64)) if rank else 1
        if version >= 4:
            type_id = number("<B")
            if type_id not in _DTYPES:
                raise Ct2FormatError(f"model.bin: {name} has an unknown data type id {type_id}")
            dtype = _DTYPES[type_id]
            nbytes = number("<I")
        else:
            itemsize = number("<B")
            if itemsize not in _ITEMSIZE_DTYPES:
                raise Ct2FormatError(f"model.bin: {name} has an unknown item size {itemsize}")
            dtype = _ITEMSIZE_DTYPES[itemsize]
            nbytes = number("<I") * itemsize
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        if nbytes != count * itemsize:
            raise Ct2FormatError(f"model.bin: {name} has {nbytes} bytes for shape {shape} of {dtype}")
        raw = source.read(nbytes)
        if dtype == "bfloat16":  # the upper half of a float32
            array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        variables[name] = array.reshape(shape)
    aliases: dict[str, str] = {}
    if version >= 3:
        for _ in range(number("<I")):
            alias = string()
            aliases[alias] = string()
    if source.position != source.size:
        raise Ct2FormatError(
            f"model.bin has {source.size - source.position} bytes left over after offset {source.position}"
        )
    for alias, target in aliases.items():
        if target not in variables:
            raise Ct2FormatError(f"model.bin: alias {alias} points to a missing variable {target}")
    return Ct2Model(version, spec, revision, variables, aliases)


# ---------------------------------------------------------------------------------------------
# Variables → transformers state dict


@dataclass(slots=True)
class Architecture:
    d_model: int
    num_mel_bins: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    vocab_size: int
    max_source_positions: int
    max_target_positions: int
    tie_word_embeddings: bool = True


class _Weights:
    """Float32 tensors out of a Ct2Model, remembering which variables were used."""

    def __init__(self, model: Ct2Model) -> None:
        self.model = model
        self.used: set[str] = set()

    def get(self, name: str) -> NDArray[np.float32]:
        if name not in self.model:
            raise Ct2FormatError(f"model.bin has no variable {name}")
        self.used.add(name)
        array = self.model.raw(name)
        if array.dtype in (np.int8, np.int16):  # quantized: CTranslate2 stores round(w * scale)
            scale_name = f"{name}_scale"
            if scale_name not in self.model:
                raise Ct2FormatError(f"model.bin: {name} is {array.dtype} but {scale_name} is missing")
            self.used.add(scale_name)
            scale = self.model.raw(scale_name).astype(np.float32)
            values = array.astype(np.float32)
            if scale.ndim:  # one scale per output row
                scale = scale.reshape((-1,) + (1,) * (values.ndim - 1))
            return values / scale
        return array.astype(np.float32)

    def norm(self, prefix: str, target: str, out: dict[str, NDArray[np.float32]]) -> None:
        out[f"{target}.weight"] = self.get(f"{prefix}/gamma")
        out[f"{target}.bias"] = self.get(f"{prefix}/beta")

    def linear(self, prefix: str, target: str, out: dict[str, NDArray[np.float32]]) -> None:
        out[f"{target}.weight"] = self.get(f"{prefix}/weight")
        out[f"{target}.bias"] = self.get(f"{prefix}/bias")

    def fused(self, prefix: str, targets: list[str], out: dict[str, NDArray[np.float32]], width: int) -> None:
        """Split a fused projection along its output rows; a key projection has no bias."""
        weight, bias = self.get(f"{prefix}/weight"), self.get(f"{prefix}/bias")
        if weight.shape[0] != len(targets) * width:
            raise Ct2FormatError(f"model.bin: {prefix}/weight has shape {weight.shape}, not {len(targets)}×{width}")
        for index, target in enumerate(targets):
            rows = slice(index * width, (index + 1) * width)
            out[f"{target}.weight"] = np.ascontiguousarray(weight[rows])
            if target.endswith("k_proj"):
                if np.any(bias[rows] != 0):  # CTranslate2 fills zeros there; anything else cannot be held
                    raise Ct2FormatError(f"model.bin: {prefix} has a non-zero key bias")
                continue
            out[f"{target}.bias"] = np.ascontiguousarray(bias[rows])

    def layer(
        self, source: str, target: str, out: dict[str, NDArray[np.float32]], width: int, cross_attention: bool
    ) -> None:
        """One transformer layer: self-attention, (for the decoder) cross-attention, feed-forward."""
        self.norm(f"{source}/self_attention/layer_norm", f"{target}.self_attn_layer_norm", out)
        qkv = [f"{target}.self_attn.{p}_proj" for p in "qkv"]
        self.fused(f"{source}/self_attention/linear_0", qkv, out, width)
        self.linear(f"{source}/self_attention/linear_1", f"{target}.self_attn.out_proj", out)
        if cross_attention:
            self.norm(f"{source}/attention/layer_norm", f"{target}.encoder_attn_layer_norm", out)
            self.linear(f"{source}/attention/linear_0", f"{target}.encoder_attn.q_proj", out)
            kv = [f"{target}.encoder_attn.{p}_proj" for p in "kv"]
            self.fused(f"{source}/attention/linear_1", kv, out, width)
            self.linear(f"{source}/attention/linear_2", f"{target}.encoder_attn.out_proj", out)
        self.norm(f"{source}/ffn/layer_norm", f"{target}.final_layer_norm", out)
        self.linear(f"{source}/ffn/linear_0", f"{target}.fc1", out)
        self.linear(f"{source}/ffn/linear_1", f"{target}.fc2", out)


def _layers(model: Ct2Model, stack: str) -> int:
    count = 0
    while f"{stack}/layer_{count}/ffn/linear_0/weight" in model:
        count += 1
    return count


def to_state_dict(model: Ct2Model) -> tuple[dict[str, NDArray[np.float32]], Architecture]:
    """The transformers `WhisperForConditionalGeneration` state dict (float32) and its architecture."""
    if model.spec != "WhisperSpec":
        raise Ct2FormatError(f"model.bin holds a {model.spec or 'unnamed'} model, not Whisper")
    weights = _Weights(model)
    conv1 = weights.get("encoder/conv1/weight")
    d_model = int(conv1.shape[0])
    for name, expected in _STANDARD_DECODER.items():
        if model.scalar(name, expected) != expected:
            raise Ct2FormatError(f"model.bin: {name} = {model.scalar(name)}, not a standard Whisper decoder")
        weights.used.add(name)
    weights.used.update(name for name in _SETTINGS if name in model)
    heads = {stack: model.scalar(f"{stack}/num_heads") for stack in ("encoder", "decoder")}
    if None in heads.values():
        raise Ct2FormatError("model.bin does not say its number of attention heads")
    arch = Architecture(
        d_model=d_model,
        num_mel_bins=int(conv1.shape[1]),
        encoder_layers=_layers(model, "encoder"),
        decoder_layers=_layers(model, "decoder"),
        encoder_attention_heads=int(heads["encoder"] or 0),
        decoder_attention_heads=int(heads["decoder"] or 0),
        encoder_ffn_dim=int(model.raw("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        decoder_ffn_dim=int(model.raw("decoder/layer_0/ffn/linear_0/weight").shape[0]),
        vocab_size=int(model.raw("decoder/embeddings/weight").shape[0]),
        max_source_positions=int(model.raw("encoder/position_encodings/encodings").shape[0]),
        max_target_positions=int(model.raw("decoder/position_encodings/encodings").shape[0]),
    )
    state: dict[str, NDArray[np.float32]] = {}
    encoder, decoder = "model.encoder", "model.decoder"
    state[f"{encoder}.conv1.weight"] = conv1
    state[f"{encoder}.conv1.bias"] = weights.get("encoder/conv1/bias")
    state[f"{encoder}.conv2.weight"] = weights.get("encoder/conv2/weight")
    state[f"{encoder}.conv2.bias"] = weights.get("encoder/conv2/bias")
    state[f"{encoder}.embed_positions.weight"] = weights.get("encoder/position_encodings/encodings")
    weights.norm("encoder/layer_norm", f"{encoder}.layer_norm", state)
    for i in range(arch.encoder_layers):
        weights.layer(f"encoder/layer_{i}", f"{encoder}.layers.{i}", state, d_model, cross_attention=False)
    embeddings = weights.get("decoder/embeddings/weight")
    state[f"{decoder}.embed_tokens.weight"] = embeddings
    state[f"{decoder}.embed_positions.weight"] = weights.get("decoder/position_encodings/encodings")
    weights.norm("decoder/layer_norm", f"{decoder}.layer_norm", state)
    for i in range(arch.decoder_layers):
        weights.layer(f"decoder/layer_{i}", f"{decoder}.layers.{i}", state, d_model, cross_attention=True)
    projection = "decoder/projection/weight"
    if model.aliases.get(projection) == "decoder/embeddings/weight":
        weights.used.add(projection)
    else:
        output = weights.get(projection)
        if not np.array_equal(output, embeddings):
            arch.tie_word_embeddings = False
            state["proj_out.weight"] = output
    if "decoder/projection/bias" in model and np.any(weights.get("decoder/projection/bias") != 0):
        raise Ct2FormatError("model.bin: the output projection has a bias, which Whisper does not")
    unknown = sorted(name for name in [*model.variables, *model.aliases] if name not in weights.used)
    if unknown:
        raise Ct2FormatError(f"model.bin has variables this converter does not know: {', '.join(unknown[:8])}")
    for name, array in state.items():
        if not np.isfinite(array).all():
            raise Ct2FormatError(f"model.bin: {name} holds values that are not finite")
    return state, arch


# ---------------------------------------------------------------------------------------------
# Tokenizer


@dataclass(slots=True)
class Vocabulary:
    """Token ids the generation config needs."""

    specials: dict[str, int]  # special and timestamp tokens by text
    special_order: list[str]  # the special tokens (not timestamps) in id order


def repair_merges(vocab: dict[str, int], merges: list[str]) -> list[str]:
    """Put back merges missing from a byte-level BPE (a token no merge produces) and order merges by id.

    In byte-level BPE the token made by the merge of rank r has id 256 + r, so the vocabulary
    itself says where a lost merge belongs. The multilingual tokenizer.json of the released tiny …
    medium checkpoints lacks its first merge ("Ġ t"), which makes " the" encode as two tokens;
    prompts then read differently to the model than the text it was trained on.
    """
    produced = {"".join(merge.split(" ")): merge for merge in merges}
    by_id = sorted((token_id, token) for token, token_id in vocab.items() if token_id >= 256)
    repaired: list[str] = []
    for token_id, token in by_id:
        merge = produced.get(token)
        if merge is None:
            splits = [
                f"{token[:cut]} {token[cut:]}"
                for cut in range(1, len(token))
                if vocab.get(token[:cut], token_id) < token_id and vocab.get(token[cut:], token_id) < token_id
            ]
            if len(splits) != 1:
                continue  # not a merged token (or ambiguous): leave the vocabulary as it is
            merge = splits[0]
        repaired.append(merge)
    known = set(repaired)
    return repaired + [merge for merge in merges if merge not in known]


def write_tokenizer(source: Path, out: Path, vocab_size: int) -> Vocabulary:
    """Write the transformers tokenizer files from tokenizer.json, with the timestamp tokens added,
    and check every id against vocabulary.txt (or vocabulary.json)."""
    try:
        document = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
        bpe_model = document["model"]
        vocab: dict[str, int] = bpe_model["vocab"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in bpe_model["merges"]]
        added = sorted((int(t["id"]), str(t["content"])) for t in document["added_tokens"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Ct2FormatError(f"tokenizer.json is missing or unreadable: {exc}") from None
    if bpe_model.get("type") != "BPE":
        raise Ct2FormatError("tokenizer.json is not a byte-level BPE tokenizer")
    specials = {content: token_id for token_id, content in added}
    for name in _REQUIRED_SPECIALS:
        if name not in specials:
            raise Ct2FormatError(f"tokenizer.json has no {name} token")
    if not any(name in specials for name in _NO_SPEECH):
        raise Ct2FormatError("tokenizer.json has no <|nocaptions|> (or <|nospeech|>) token")
    bpe = {token: token_id for token, token_id in vocab.items() if token not in specials}
    if sorted(bpe.values()) != list(range(len(bpe))):
        raise Ct2FormatError("tokenizer.json: the BPE ids are not contiguous from 0")
    if [token_id for token_id, _ in added] != list(range(len(bpe), len(bpe) + len(added))):
        raise Ct2FormatError("tokenizer.json: the special tokens do not follow the BPE vocabulary")
    no_timestamps = specials["<|notimestamps|>"]
    if no_timestamps != added[-1][0]:
        raise Ct2FormatError("tokenizer.json: <|notimestamps|> is not the last special token")
    timestamps = vocab_size - no_timestamps - 1
    if timestamps < 0:
        raise Ct2FormatError(f"the model has {vocab_size} tokens, fewer than tokenizer.json ({no_timestamps + 1})")
    every = {**specials, **{f"<|{i * TIMESTAMP_STEP_S:.2f}|>": no_timestamps + 1 + i for i in range(timestamps)}}
    _check_vocabulary_file(source, {**bpe, **every}, vocab_size)

    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(bpe, ensure_ascii=False), encoding="utf-8")
    lines = "\n".join(repair_merges(bpe, merges))
    (out / "merges.txt").write_text(f"#version: 0.2\n{lines}\n", encoding="utf-8")
    (out / "added_tokens.json").write_text(json.dumps(every, ensure_ascii=False), encoding="utf-8")
    order = [content for _, content in added]
    tokens = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    tokens["unk_token"] = "<|endoftext|>"
    (out / "special_tokens_map.json").write_text(
        json.dumps({**tokens, "additional_special_tokens": order}, indent=1), encoding="utf-8"
    )
    config = {
        **tokens,
        "additional_special_tokens": order,
        "add_prefix_space": False,
        "errors": "replace",
        "model_max_length": 1024,
        "processor_class": "WhisperProcessor",
        "tokenizer_class": "WhisperTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return Vocabulary(every, order)


def _check_vocabulary_file(source: Path, ids: dict[str, int], vocab_size: int) -> None:
    """CTranslate2's own id → token list must agree with tokenizer.json token for token."""
    if (source / "vocabulary.json").is_file():
        tokens: list[str] = json.loads((source / "vocabulary.json").read_text(encoding="utf-8"))
    elif (source / "vocabulary.txt").is_file():
        tokens = (source / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
    else:
        raise Ct2FormatError("vocabulary.txt (or vocabulary.json) is missing")
    if len(tokens) != vocab_size:
        raise Ct2FormatError(f"vocabulary.txt has {len(tokens)} tokens, the model {vocab_size}")
    by_id = {token_id: token for token, token_id in ids.items()}
    wrong = [i for i, token in enumerate(tokens) if by_id.get(i) != token]
    if wrong:
        raise Ct2FormatError(f"vocabulary.txt disagrees with tokenizer.json at ids {wrong[:5]}")


# ---------------------------------------------------------------------------------------------
# The whole folder


def generation_config(source_config: dict[str, Any], arch: Architecture, vocabulary: Vocabulary) -> dict[str, Any]:
    tokens = vocabulary.specials
    eot, sot = tokens["<|endoftext|>"], tokens["<|startoftranscript|>"]
    heads = source_config.get("alignment_heads") or [
        [layer, head]
        for layer in range(arch.decoder_layers // 2, arch.decoder_layers)
        for head in range(arch.decoder_attention_heads)
    ]
    generation: dict[str, Any] = {
        "decoder_start_token_id": sot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "bos_token_id": eot,
        "max_length": arch.max_target_positions,
        "begin_suppress_tokens": [int(t) for t in source_config.get("suppress_ids_begin") or [220, eot]],
        "no_timestamps_token_id": tokens["<|notimestamps|>"],
        "prev_sot_token_id": tokens["<|startofprev|>"],
        "max_initial_timestamp_index": 50,
        "is_multilingual": _is_multilingual(arch.vocab_size, vocabulary),
        "alignment_heads": [[int(layer), int(head)] for layer, head in heads],
        "return_timestamps": False,
    }
    if source_config.get("suppress_ids") is not None:
        generation["suppress_tokens"] = [int(t) for t in source_config["suppress_ids"]]
    if generation["is_multilingual"]:
        names = {token_id: token for token, token_id in tokens.items()}
        language_ids = source_config.get("lang_ids") or [
            token_id
            for token in vocabulary.special_order
            if token not in _REQUIRED_SPECIALS
            and token not in _NO_SPEECH
            and (token_id := tokens[token]) not in (sot, eot)
        ]
        generation["lang_to_id"] = {names[int(i)]: int(i) for i in sorted(language_ids)}
        generation["task_to_id"] = {"transcribe": tokens["<|transcribe|>"], "translate": tokens["<|translate|>"]}
    return generation


def _is_multilingual(vocab_size: int, vocabulary: Vocabulary) -> bool:
    """OpenAI's rule for the released vocabularies (the English-only one has 51864 tokens); any other
    vocabulary is multilingual when it has language tokens beyond <|en|>."""
    if vocab_size >= MULTILINGUAL_VOCAB - 1:
        return vocab_size >= MULTILINGUAL_VOCAB
    languages = [t for t in vocabulary.special_order if t not in _REQUIRED_SPECIALS and t not in _NO_SPEECH]
    return len([t for t in languages if t != "<|en|>"]) > 0


def storage_dtype(model: Ct2Model) -> str:
    """float16 when every stored weight is float16 (widening and narrowing back are exact), else float32."""
    stored = {str(v.dtype) for v in model.variables.values() if v.ndim >= 2}
    return "float16" if stored == {"float16"} else "float32"


def read_header_version(first_part: Path) -> int:
    with first_part.open("rb") as file:
        return int(struct.unpack("<I", file.read(4))[0])
