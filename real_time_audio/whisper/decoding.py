"""Whisper's encoder on audio-sized windows, and greedy decoding one step at a time.

**Sized windows.** Whisper hears 30 s windows, and a live window usually holds a few seconds of
speech followed by padding. The encoder's work grows with the window, so most of it goes into the
padding. `encode_sized` runs the encoder's own modules (convolutions, positional embeddings cut
to the input, layers, final norm) only on the audio plus some seconds of padding; the decoder's
cross-attention then reads the rest of the 30 s from `Silence`: the keys and values of the
encoder's output for a silent window, computed once. So the decoder still sees a full-length
encoding whose tail is what padding looks like to it. (Cutting the encoding short instead makes
the decoder lose track of where the audio ends: it repeats itself.) The padding that is computed
lets the audio's last frames see silence after them as they would in a full window;
docs/benchmarks.md has what this does to accuracy.

**Cross-attention once.** `cross_attention` computes each decoder layer's cross-attention keys
and values once per batch (only for the frames that were encoded); the first decoder step, which
reads the no-speech probability and the language, and every step of the decode share them.

**A lean step.** `greedy_decode` calls the decoder with its key/value cache once per token for the
whole batch and keeps only what the server uses: each chosen token, its log-probability after
the suppressions, and the alignment heads' cross-attention of the query that produced it (for
word timings). It applies the model's suppressed tokens at every step and its begin-suppressed
tokens at the first, as `generate` does for Whisper, and gives the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

FRAMES_PER_SECOND = 50  # encoder frames (after the stride-2 convolution)
MEL_FRAMES_PER_FRAME = 2
FULL_WINDOW_S = 30.0


def sized_window_s(longest_s: float, pad_s: float, bucket_s: float) -> float:
    """Encoder window for a batch whose longest clip lasts `longest_s`: that plus `pad_s`, rounded
    up to a multiple of `bucket_s` (batches of similar clips share one shape), at most 30 s."""
    wanted = longest_s + pad_s
    return min(FULL_WINDOW_S, max(bucket_s, math.ceil(wanted / bucket_s - 1e-9) * bucket_s))


def encode_sized(encoder: Any, features: Any) -> Any:
    """The encoder's output for mel `features` of any length up to its 30 s window."""
    import torch

    if features.shape[-1] // MEL_FRAMES_PER_FRAME > encoder.embed_positions.num_embeddings:
        raise ValueError(f"{features.shape[-1]} mel frames is more than the encoder's window")
    hidden = torch.nn.functional.gelu(encoder.conv1(features))
    hidden = torch.nn.functional.gelu(encoder.conv2(hidden)).permute(0, 2, 1)
    hidden = hidden + encoder.embed_positions.weight[: hidden.shape[1]]
    for layer in encoder.layers:
        hidden = layer(hidden, None)
    return encoder.layer_norm(hidden)


@dataclass(frozen=True, slots=True)
class Silence:
    """Each decoder layer's cross-attention keys and values (heads × frames × head size) for the
    encoder's output on a silent 30 s window: the tail every sized window continues with."""

    keys: list[Any]
    values: list[Any]

    @classmethod
    def of(cls, model: Any, features: Any) -> Silence:
        """From the mel features of a silent clip (one row, padded to 30 s)."""
        hidden = model.get_encoder()(features).last_hidden_state
        states = cross_attention(model, hidden)
        return cls([k[0] for k, _ in states], [v[0] for _, v in states])


def cross_attention(model: Any, encoded: Any, silence: Silence | None = None) -> list[tuple[Any, Any]]:
    """Each decoder layer's cross-attention keys and values (rows × heads × frames × head size)
    for `encoded`; when it is shorter than the full window, `silence` gives the rest."""
    import torch

    rows, frames = encoded.shape[:2]
    states: list[tuple[Any, Any]] = []
    for index, layer in enumerate(model.get_decoder().layers):
        attention = layer.encoder_attn
        shape = (rows, frames, attention.num_heads, attention.head_dim)
        keys = attention.k_proj(encoded).view(shape).transpose(1, 2)
        values = attention.v_proj(encoded).view(shape).transpose(1, 2)
        if silence is not None and frames < silence.keys[index].shape[1]:
            tail = (rows, -1, -1, -1)
            keys = torch.cat([keys, silence.keys[index][None, :, frames:].expand(tail)], dim=2)
            values = torch.cat([values, silence.values[index][None, :, frames:].expand(tail)], dim=2)
        states.append((keys.contiguous(), values.contiguous()))
    return states


def join_rows(groups: list[list[tuple[Any, Any]]]) -> list[tuple[Any, Any]]:
    """The cross-attention states of several groups of rows (each full-length), as one batch."""
    import torch

    if len(groups) == 1:
        return groups[0]
    return [(torch.cat([g[i][0] for g in groups]), torch.cat([g[i][1] for g in groups])) for i in range(len(groups[0]))]


def _encoder_marker(model: Any, cross: list[tuple[Any, Any]]) -> Any:
    """What the decoder is given as the encoder's output: with its cross-attention cache filled it
    reads keys and values from there and only needs to be told that there is an encoder."""
    keys = cross[0][0]
    return keys.new_zeros((keys.shape[0], 1, model.config.d_model))


def new_cache(cross: list[tuple[Any, Any]]) -> Any:
    """A decoder cache whose cross-attention part is already filled (the decoder then reuses it)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    filled = DynamicCache()
    for index, (keys, values) in enumerate(cross):
        filled.update(keys, values, index)
    return EncoderDecoderCache(DynamicCache(), filled)


def first_step(model: Any, cross: list[tuple[Any, Any]], token: int) -> Any:
    """The decoder's logits (rows × vocabulary) after `token` alone (start of transcript)."""
    import torch

    marker = _encoder_marker(model, cross)
    ids = torch.full((marker.shape[0], 1), token, device=marker.device)
    out = model.get_decoder()(
        input_ids=ids, encoder_hidden_states=marker, past_key_values=new_cache(cross), use_cache=True
    )
    return model.proj_out(out.last_hidden_state[:, -1]).float()


@dataclass(slots=True)
class Decoded:
    """One row's decode. `tokens`: the generated tokens (after the decoder prompt), up to and
    including end-of-text; `logprobs`: the log-probability of each; `attention`: the alignment
    heads' cross-attention, heads × (forced prefix + generated tokens) × frames."""

    tokens: list[int]
    logprobs: list[float]
    attention: NDArray[np.float32]


def greedy_decode(
    model: Any,
    cross: list[tuple[Any, Any]],
    prompts: list[list[int]],
    prefixes: list[int],
    max_new_tokens: int,
    *,
    pad: int,
    eot: int,
    suppress: list[int],
    begin_suppress: list[int],
    heads: list[list[int]],
    forced_tokens: int | None = None,
) -> list[Decoded]:
    """Greedy decoding of every row at once, one decoder call per step, until every row has
    written end-of-text or `max_new_tokens` are written.

    `prompts`: each row's decoder prompt (left-padded here to one width), ending with its forced
    prefix, the last `prefixes[row]` tokens. `forced_tokens`: every row writes exactly that many
    tokens (a capacity measurement).
    """
    import torch

    encoded = _encoder_marker(model, cross)
    device = encoded.device
    rows = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    vocabulary = model.proj_out.out_features
    blocked = torch.zeros(vocabulary, dtype=torch.bool, device=device)
    blocked[[t for t in suppress if t < vocabulary]] = True
    blocked_first = blocked.clone()
    blocked_first[[t for t in begin_suppress if t < vocabulary]] = True
    # A row with a forced prefix is past its beginning: only the plain suppressions apply to it.
    first_rows = torch.stack([blocked if count else blocked_first for count in prefixes])
    layers = sorted({layer for layer, _ in heads})
    tokens: list[list[int]] = [[] for _ in range(rows)]
    logprobs: list[list[float]] = [[] for _ in range(rows)]
    steps: list[Any] = []
    prefix_attention: Any = None
    finished = [False] * rows
    cache = new_cache(cross)
    decoder = model.get_decoder()
    for step in range(max_new_tokens):
        out = decoder(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=encoded,
            past_key_values=cache,
            position_ids=positions,
            use_cache=True,
            output_attentions=True,
        )
        cache = out.past_key_values
        weights = {layer: out.cross_attentions[layer] for layer in layers}
        if step == 0 and any(prefixes):
            prefix_attention = torch.stack([weights[layer][:, head] for layer, head in heads], dim=1)
        steps.append(torch.stack([weights[layer][:, head, -1] for layer, head in heads], dim=1))
        logits = model.proj_out(out.last_hidden_state[:, -1]).float()
        logits = logits.masked_fill(first_rows if step == 0 else blocked, -math.inf)
        if forced_tokens is not None:
            logits[:, eot] = -math.inf
        scores = logits.log_softmax(dim=-1)
        chosen = scores.argmax(dim=-1)
        picked = scores.gather(1, chosen[:, None])[:, 0].tolist()
        chosen_ids = chosen.tolist()
        for row in range(rows):
            if finished[row]:
                chosen_ids[row] = eot  # a finished row only pads
                continue
            tokens[row].append(chosen_ids[row])
            logprobs[row].append(picked[row])
            finished[row] = chosen_ids[row] == eot
        if (step + 1 >= forced_tokens) if forced_tokens is not None else all(finished):
            break
        ids = torch.tensor(chosen_ids, device=device)[:, None]
        mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
    stacked = torch.stack(steps, dim=2).float().cpu().numpy()  # rows × heads × steps × frames
    results = []
    for row in range(rows):
        attention = stacked[row, :, : len(tokens[row])]
        count = prefixes[row]
        if count:  # the queries that "produced" the forced prefix sit just before the prompt's end
            before = prefix_attention[row, :, -count - 1 : -1].float().cpu().numpy()
            attention = np.concatenate([before, attention], axis=1)
        results.append(Decoded(tokens[row], logprobs[row], attention))
    return results
