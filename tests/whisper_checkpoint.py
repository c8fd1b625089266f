"""Build a tiny random-weight Whisper checkpoint for the test suite, fully offline.

The tokenizer is made here too (a byte-level BPE with a few hundred syllable tokens and the
Whisper special tokens), so the tests need nothing outside the project. The weights are random
but rescaled so that different audio gives different, deterministic text.
"""

from __future__ import annotations

import json
from pathlib import Path

LANGUAGES = ("en", "de", "es", "fr", "it", "pt", "nl", "ja")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _write_tokenizer(out: Path) -> tuple[dict[str, int], list[int]]:
    """Write vocab.json, merges.txt and the special tokens; return (special ids, ids to suppress)."""
    byte_chars = _bytes_to_unicode()
    vocab: dict[str, int] = {ch: i for i, ch in enumerate(byte_chars.values())}
    merges: list[str] = []
    space = byte_chars[ord(" ")]
    for c in _CONSONANTS:
        for v in _VOWELS:
            syllable = c + v
            if syllable not in vocab:
                merges.append(f"{c} {v}")
                vocab[syllable] = len(vocab)
            merges.append(f"{space} {syllable}")
            vocab[space + syllable] = len(vocab)
    specials = ["<|endoftext|>", "<|startoftranscript|>"]
    specials += [f"<|{lang}|>" for lang in LANGUAGES]
    specials += [
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
    ]
    specials += [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    added = {tok: len(vocab) + i for i, tok in enumerate(specials)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (out / "added_tokens.json").write_text(json.dumps(added))
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "additional_special_tokens": specials[1:],
            }
        )
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "WhisperTokenizer",
                "model_max_length": 1024,
                "errors": "replace",
                "add_prefix_space": False,
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        )
    )
    # Keep the text readable: only whole syllable tokens (and end-of-text) may be generated.
    suppress = [i for ch, i in vocab.items() if len(ch) == 1]
    suppress += [i for tok, i in added.items() if tok != "<|endoftext|>"]
    return added, suppress


def build_checkpoint(out: Path, *, d_model: int = 64, layers: int = 2, heads: int = 2, seed: int = 0) -> Path:
    """Write a complete Hugging Face Whisper folder (config, tokenizer, feature extractor, weights)."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizer,
    )

    out.mkdir(parents=True, exist_ok=True)
    added, suppress = _write_tokenizer(out)
    eot, sot = added["<|endoftext|>"], added["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=max(added.values()) + 1,
        num_mel_bins=80,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model,
        max_source_positions=1500,
        max_target_positions=448,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
    )
    generation = GenerationConfig(
        decoder_start_token_id=sot,
        eos_token_id=eot,
        pad_token_id=eot,
        bos_token_id=eot,
        suppress_tokens=suppress,
        begin_suppress_tokens=[eot],
        no_timestamps_token_id=added["<|notimestamps|>"],
        prev_sot_token_id=added["<|startofprev|>"],
        max_initial_timestamp_index=50,
        is_multilingual=True,
        alignment_heads=[[layers - 1, h] for h in range(heads)],
        lang_to_id={f"<|{lang}|>": added[f"<|{lang}|>"] for lang in LANGUAGES},
        task_to_id={"transcribe": added["<|transcribe|>"], "translate": added["<|translate|>"]},
    )
    WhisperTokenizer.from_pretrained(out).save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    with torch.no_grad():
        # A fresh random Whisper ignores its input; amplify the audio path so text follows audio.
        model.model.encoder.conv1.weight.mul_(20)
        model.model.encoder.conv2.weight.mul_(20)
        for layer in model.model.decoder.layers:
            layer.encoder_attn.q_proj.weight.mul_(20)
            layer.encoder_attn.k_proj.weight.mul_(20)
            layer.encoder_attn.v_proj.weight.mul_(10)
            layer.encoder_attn.out_proj.weight.mul_(10)
    model.generation_config = generation
    model.save_pretrained(out)
    return out
