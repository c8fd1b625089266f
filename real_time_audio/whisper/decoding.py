"""Whisper's encoder on audio-sized windows, and greedy decoding one step at a time.

**Sized windows.** Whisper hears 30 s windows, and a live window usually holds a few seconds of
speech followed by padding. The encoder's work grows with the window, so most of it goes into the
padding. `encode_sized` runs the encoder's own modules (convolutions, positional embeddings cut
to the input, layers, final norm) only on the audio plus some seconds of padding, and on a few
frames of the rest: every 25th, and the *sinks*, frames of the padding whose states grow far
larger than the others' (base has about 130; attention leans on them). What the other padding
frames hold comes from `Silence`, a window of padding alone, encoded once per padding level,
corrected by how much the computed frames differ from it (interpolated between them). In every
encoder layer the sized frames attend to their own keys and values and to the corrected
padding's, and so does the decoder's cross-attention. So each frame still attends over 30 s, the
decoder still sees a full-length encoding whose tail is what padding looks like after this
speech, and with every padding frame computed it is the full window exactly. Cutting the
encoding short instead makes the decoder lose track of where the audio ends: it repeats itself.
The padding level matters: Whisper's features clip every value 8 (log10) below the window's
loudest, so the padding of a loud clip is louder than that of a quiet one, and each level has its
own silence. docs/benchmarks.md has what this does to accuracy and time.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from real_time_audio.service import Interrupted

FRAMES_PER_SECOND = 50  # encoder frames (after the stride-2 convolution)
MEL_FRAMES_PER_FRAME = 2
FULL_WINDOW_S = 30.0
DIGITAL_SILENCE_LEVEL = -1.5  # the padding level of a quiet window: (log10 of 1e-10, plus 4) / 4
PADDING_STRIDE = 25  # a sized window computes every 25th padding frame (0.5 s) ...
SINK_NORM = 3.0  # ... and every padding frame whose state is 3 times the median's size in some layer


def check(interrupt: Callable[[], bool] | None) -> None:
    """Raise `Interrupted` when the engine has asked for this worker back (between model calls)."""
    if interrupt is not None and interrupt():
        raise Interrupted


def sized_window_s(longest_s: float, pad_s: float, bucket_s: float) -> float:
    """Encoder window for a batch whose longest clip lasts `longest_s`: that plus `pad_s`, rounded
    up to a multiple of `bucket_s` (batches of similar clips share one shape), at most 30 s."""
    wanted = longest_s + pad_s
    return min(FULL_WINDOW_S, max(bucket_s, math.ceil(wanted / bucket_s - 1e-9) * bucket_s))


def encode_sized(
    encoder: Any,
    features: Any,
    frames: int | None = None,
    tails: list[Silence] | None = None,
    stride: int = PADDING_STRIDE,
    sinks: list[int] | None = None,
    interrupt: Callable[[], bool] | None = None,
) -> Any:
    """The encoder's output for the first `frames` encoder frames (all by default) of mel
    `features` (at most the encoder's 30 s window).

    The convolutions also read the two mel frames after the last one where `features` has them,
    so the last frames are what they are in the whole window. Without `tails` the result is the
    encoder output of those frames alone. With `tails` (one silent window per row) it is a
    `SizedEncoding`: every layer's self-attention also reads keys and values for the rest of the
    window, so each frame attends over a whole 30 s window as it does in the full encoder. Those
    are the row's silence's, corrected by what the speech does to the padding: a few padding
    frames (every `stride`-th, and the `sinks`: by default the rows' silences') go through the
    layers with the row's own frames, and the difference between their keys and values and the
    silence's is spread over the padding between them. The frames computed depend only on
    `frames`, `stride` and `sinks`, so with fixed sinks a row's encoding does not depend on the
    other rows of its batch. `interrupt` is checked between layers (`check`)."""
    import torch

    rows, window = features.shape[0], encoder.embed_positions.num_embeddings
    if frames is None:
        frames = features.shape[-1] // MEL_FRAMES_PER_FRAME
    if features.shape[-1] > window * MEL_FRAMES_PER_FRAME or frames > window:
        raise ValueError(f"{features.shape[-1]} mel frames is more than the encoder's window")
    hidden = _embedded(encoder, features[..., : MEL_FRAMES_PER_FRAME * frames + 2], frames)
    if tails is None or frames == window:
        for layer in encoder.layers:
            check(interrupt)
            hidden = layer(hidden, None)
        encoded = encoder.layer_norm(hidden)
        return encoded if tails is None else SizedEncoding(encoded, encoded[:, :0], tails, Spread(frames, window, []))
    if sinks is None:
        sinks = sorted({p for t in tails for p in t.sinks})
    spread = Spread.of(frames, window, stride, [p for p in sinks if p >= frames], features.device)
    hidden = torch.cat([hidden, _embedded_at(encoder, features, spread.positions)], dim=1)
    length = hidden.shape[1]
    for index, layer in enumerate(encoder.layers):
        check(interrupt)
        attention = layer.self_attn
        normed = layer.self_attn_layer_norm(hidden)
        queries = _heads(attention, attention.q_proj(normed) * attention.scaling)
        keys = _heads(attention, attention.k_proj(normed))
        values = _heads(attention, attention.v_proj(normed))
        keys = spread.join(keys[:, :, :frames], keys[:, :, frames:], [t.encoder_keys[index] for t in tails])
        values = spread.join(values[:, :, :frames], values[:, :, frames:], [t.encoder_values[index] for t in tails])
        attended = torch.nn.functional.scaled_dot_product_attention(queries, keys, values, scale=1.0)
        hidden = hidden + attention.out_proj(attended.transpose(1, 2).reshape(rows, length, -1))
        hidden = hidden + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden))))
        if hidden.dtype == torch.float16:  # as the encoder's own layers keep float16 finite
            bound = torch.finfo(torch.float16).max - 1000
            hidden = hidden.clamp(min=-bound, max=bound)
    encoded = encoder.layer_norm(hidden)
    return SizedEncoding(encoded[:, :frames], encoded[:, frames:], tails, spread)


@dataclass(frozen=True, slots=True)
class Spread:
    """Which padding frames past `frames` a sized window computes (`positions`), and how their
    corrections are spread over the rest: linearly between the evenly spaced `anchors`; a sink
    (a frame whose state is far larger than the others') keeps its own correction only. The
    index tensors that `fill` uses are made once, on the window's device."""

    frames: int
    window: int
    positions: list[int]
    anchors: list[int] = field(default_factory=list)
    _offsets: Any = None  # positions - frames
    _anchored: Any = None  # where each anchor is among the positions
    _lower: Any = None  # for each padding frame: the anchor before it, the one after, and the weight
    _upper: Any = None
    _weight: Any = None

    @classmethod
    def of(cls, frames: int, window: int, stride: int, sinks: list[int], device: Any = None) -> Spread:
        import torch

        sunk = set(sinks)
        anchors = [p for p in range(frames, window, stride) if p not in sunk]
        if window - 1 not in sunk and (not anchors or anchors[-1] != window - 1):
            anchors.append(window - 1)
        positions = sorted(sunk | set(anchors))
        index = {p: i for i, p in enumerate(positions)}
        padding = torch.arange(frames, window, dtype=torch.float32, device=device)
        at = torch.tensor(anchors, dtype=torch.float32, device=device)
        upper = torch.searchsorted(at, padding).clamp(min=min(1, len(anchors) - 1), max=len(anchors) - 1)
        lower = (upper - 1).clamp(min=0)
        span = (at[upper] - at[lower]).clamp(min=1)
        return cls(
            frames,
            window,
            positions,
            anchors,
            torch.tensor(positions, device=device) - frames,
            torch.tensor([index[a] for a in anchors], device=device),
            lower,
            upper,
            ((padding - at[lower]) / span).clamp(0, 1)[:, None],
        )

    def join(self, own: Any, computed: Any, silences: list[Any]) -> Any:
        """Keys or values of a whole window: the sized frames' `own`, then the padding (`fill`)."""
        import torch

        return torch.cat([own, self.fill(computed, silences)], dim=2)

    def fill(self, computed: Any, silences: list[Any]) -> Any:
        """The padding's keys or values (rows × heads × padding frames × head size): each row's
        silence's (`silences`, heads × window × head size), plus the correction the `computed`
        frames (rows × heads × positions × head size) show there (constant before the first
        anchor, linear between two)."""
        import torch

        if all(s is silences[0] for s in silences):  # one silence for every row: read, not copied per row
            silence = silences[0][None, :, self.frames :]
        else:
            silence = torch.stack([s[:, self.frames :] for s in silences])
        if not self.positions:
            return silence.expand(len(silences), -1, -1, -1)
        correction = computed - silence.index_select(2, self._offsets)
        anchored = correction.index_select(2, self._anchored)
        weight = self._weight.to(correction.dtype)
        spread = anchored.index_select(2, self._lower) * (1 - weight) + anchored.index_select(2, self._upper) * weight
        spread.index_copy_(2, self._offsets, correction)
        return silence + spread


@dataclass(frozen=True, slots=True)
class SizedEncoding:
    """A sized window's encoding: its own frames (`encoded`, rows × frames × width), the padding
    frames it computed (`padding`, rows × positions × width, at `spread.positions`), and the
    silent windows (`tails`) that stand for the rest of the padding."""

    encoded: Any
    padding: Any
    tails: list[Silence]
    spread: Spread


def _embedded(encoder: Any, mel: Any, frames: int) -> Any:
    """What the encoder's first layer reads: its two convolutions over `mel`, the first `frames`
    of their output, plus the positional embeddings."""
    import torch

    hidden = torch.nn.functional.gelu(encoder.conv1(mel))
    hidden = torch.nn.functional.gelu(encoder.conv2(hidden)).permute(0, 2, 1)[:, :frames]
    return hidden + encoder.embed_positions.weight[:frames]


def _embedded_at(encoder: Any, mel: Any, positions: list[int]) -> Any:
    """What the encoder's first layer reads at the frames `positions` of the whole window of `mel`
    (rows × positions × width): the convolutions computed only where those frames need them."""
    import torch

    rows, bins = mel.shape[:2]
    # Frame p is the second convolution at mel frames 2p-1..2p+1, each the first at its neighbours:
    # mel frames 2p-2..2p+2 (zero past the window's ends), read here with one more on each side.
    padded = torch.nn.functional.pad(mel, (3, 3))
    index = torch.tensor([[2 * p + k for k in range(7)] for p in positions], device=mel.device)
    windows = padded[:, :, index].permute(0, 2, 1, 3).reshape(rows * len(positions), bins, 7)
    first = torch.nn.functional.gelu(encoder.conv1(windows))[..., 2:5]
    second = torch.nn.functional.conv1d(first, encoder.conv2.weight, encoder.conv2.bias)
    hidden = torch.nn.functional.gelu(second).reshape(rows, len(positions), -1)
    return hidden + encoder.embed_positions.weight[positions]


def _heads(attention: Any, states: Any) -> Any:
    """Projected states (rows × frames × width) split into the attention's heads (rows × heads ×
    frames × head size)."""
    rows, frames = states.shape[:2]
    return states.view(rows, frames, attention.num_heads, attention.head_dim).transpose(1, 2)


def padding_level(features: Any) -> list[float]:
    """Each row's padding level: the value of its last mel frame. Whisper's features clip every
    value at 8 (log10) below the window's loudest, so the padding of a window is as loud as that
    allows, and a louder clip has louder padding."""
    return [float(v) for v in features[:, :, -1].mean(dim=-1).tolist()]


@dataclass(frozen=True, slots=True)
class Silence:
    """A window of padding alone, at one padding level, as the model sees it: each encoder
    layer's self-attention keys and values, and each decoder layer's cross-attention keys and
    values for the encoder's output (all heads × frames × head size). A sized window reads the
    frames past its own end from here."""

    level: float
    sinks: list[int]
    encoder_keys: list[Any]
    encoder_values: list[Any]
    keys: list[Any]
    values: list[Any]

    @classmethod
    def of(cls, model: Any, level: float, device: Any = None, dtype: Any = None) -> Silence:
        """The silent 30 s window whose every mel value is `level`."""
        import torch

        encoder = model.get_encoder()
        frames = encoder.embed_positions.num_embeddings
        shape = (1, model.config.num_mel_bins, frames * MEL_FRAMES_PER_FRAME)
        hidden = _embedded(encoder, torch.full(shape, level, device=device, dtype=dtype), frames)
        encoder_keys, encoder_values = [], []
        large = torch.zeros(frames, dtype=torch.bool, device=hidden.device)
        for layer in encoder.layers:
            norms = hidden[0].float().norm(dim=-1)
            large |= norms > SINK_NORM * norms.median()
            attention = layer.self_attn
            normed = layer.self_attn_layer_norm(hidden)
            encoder_keys.append(_heads(attention, attention.k_proj(normed))[0].contiguous())
            encoder_values.append(_heads(attention, attention.v_proj(normed))[0].contiguous())
            hidden = layer(hidden, None)
        norms = hidden[0].float().norm(dim=-1)
        large |= norms > SINK_NORM * norms.median()
        states = cross_attention(model, encoder.layer_norm(hidden))
        return cls(
            level,
            large.nonzero()[:, 0].tolist(),
            encoder_keys,
            encoder_values,
            [k[0] for k, _ in states],
            [v[0] for _, v in states],
        )


def cross_attention(model: Any, encoded: Any) -> list[tuple[Any, Any]]:
    """Each decoder layer's cross-attention keys and values (rows × heads × frames × head size)
    for `encoded`: the encoder's output, or a `SizedEncoding`, whose rows continue with their
    silences' keys and values as its padding frames correct them."""
    sized = encoded if isinstance(encoded, SizedEncoding) else None
    own = sized.encoded if sized else encoded
    frames = own.shape[1]
    states: list[tuple[Any, Any]] = []
    for index, layer in enumerate(model.get_decoder().layers):
        attention = layer.encoder_attn
        keys = _heads(attention, attention.k_proj(own))
        values = _heads(attention, attention.v_proj(own))
        if sized is not None and frames < sized.spread.window:
            padding_keys = _heads(attention, attention.k_proj(sized.padding))
            padding_values = _heads(attention, attention.v_proj(sized.padding))
            keys = sized.spread.join(keys, padding_keys, [t.keys[index] for t in sized.tails])
            values = sized.spread.join(values, padding_values, [t.values[index] for t in sized.tails])
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
    drafts: list[list[int]] | None = None,
    forced_tokens: int | None = None,
    interrupt: Callable[[], bool] | None = None,
) -> list[Decoded]:
    """Greedy decoding of every row at once, one decoder call per step, until every row has
    written end-of-text or `max_new_tokens` tokens.

    `prompts`: each row's decoder prompt (left-padded here to one width), ending with its forced
    prefix, the last `prefixes[row]` tokens. `drafts`: per row, the tokens it is expected to write
    (what the previous decode of the same speech wrote), or none. The first call reads the prompt
    and the draft together; a row keeps the draft's tokens as far as each is the one greedy
    decoding would choose, adds the token chosen where they part, and goes on one step at a time
    from there. A good draft saves most steps; any draft gives the tokens greedy decoding gives.
    `forced_tokens`: every row writes exactly that many tokens (a capacity measurement; drafts
    are then ignored). `interrupt` is checked before every decoder call (`check`).
    """
    import torch

    encoded = _encoder_marker(model, cross)
    device = encoded.device
    rows = len(prompts)
    if forced_tokens is not None:  # every row runs to exactly this many tokens (end-of-text is blocked)
        max_new_tokens = min(max_new_tokens, forced_tokens)
    if drafts is None or forced_tokens is not None:
        drafts = [[] for _ in range(rows)]
    drafts = [d[: max(0, max_new_tokens - 1)] for d in drafts]
    inputs = [p + d for p, d in zip(prompts, drafts, strict=True)]
    width = max(len(i) for i in inputs)
    ids = torch.tensor([[pad] * (width - len(i)) + i for i in inputs], device=device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in inputs], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    vocabulary = model.proj_out.out_features
    blocked = torch.zeros(vocabulary, dtype=torch.bool, device=device)
    blocked[[t for t in suppress if t < vocabulary]] = True
    blocked_first = blocked.clone()
    blocked_first[[t for t in begin_suppress if t < vocabulary]] = True
    tokens: list[list[int]] = [[] for _ in range(rows)]
    logprobs: list[list[float]] = [[] for _ in range(rows)]
    attention: list[list[Any]] = [[] for _ in range(rows)]  # per row: heads × frames per token
    finished = [False] * rows
    cache = new_cache(cross)
    decoder = model.get_decoder()
    step = 0
    while True:
        check(interrupt)
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
        weights = torch.stack([out.cross_attentions[layer][:, head] for layer, head in heads], dim=1)
        if step == 0:
            # Rows × columns of the first call: column `start + len(prompt) - 1 + g` predicts the
            # row's generated token g, and the forced prefix's tokens were predicted just before.
            starts = [width - len(i) for i in inputs]
            ends = [start + len(p) - 1 for start, p in zip(starts, prompts, strict=True)]
            for row, count in enumerate(prefixes):
                if count:
                    attention[row] += list(weights[row, :, ends[row] - count : ends[row]].float().unbind(1))
            columns = [list(range(end, end + len(d) + 1)) for end, d in zip(ends, drafts, strict=True)]
            hidden = out.last_hidden_state
        else:
            columns = [[0] for _ in range(rows)]
            hidden = out.last_hidden_state[:, -1:]
        depth = max(len(c) for c in columns)
        picked_columns = torch.tensor([c + [c[-1]] * (depth - len(c)) for c in columns], device=device)
        states = hidden.gather(1, picked_columns[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = model.proj_out(states).float()  # rows × depth × vocabulary
        if step == 0:  # the first generated token: the begin suppressions, unless a prefix began the row
            first = torch.stack([blocked if count else blocked_first for count in prefixes])
            later = blocked.expand(rows, -1)
            logits = logits.masked_fill(torch.stack([first, *[later] * (depth - 1)], dim=1), -math.inf)
        else:
            logits = logits.masked_fill(blocked, -math.inf)
        if forced_tokens is not None:
            logits[..., eot] = -math.inf
        scores = logits.log_softmax(dim=-1)
        chosen = scores.argmax(dim=-1)
        chosen_scores = scores.gather(2, chosen[..., None])[..., 0].tolist()
        chosen_ids = chosen.tolist()
        next_ids = [eot] * rows
        next_positions = [0] * rows
        for row in range(rows):
            if finished[row]:
                continue
            draft = drafts[row] if step == 0 else []
            for g in range(len(columns[row])):  # the draft's tokens while greedy agrees, then greedy's own
                token = chosen_ids[row][g]
                tokens[row].append(token)
                logprobs[row].append(chosen_scores[row][g])
                attention[row].append(weights[row, :, columns[row][g]].float())
                if token == eot or len(tokens[row]) >= max_new_tokens:
                    finished[row] = True
                    break
                if g >= len(draft) or token != draft[g]:
                    break
            if step == 0 and drafts[row]:
                # The draft tokens after the last one kept stay in the cache, hidden from later steps.
                kept = len(tokens[row]) - 1
                end = starts[row] + len(inputs[row])
                mask[row, end - len(drafts[row]) + kept : end] = 0
            next_ids[row] = tokens[row][-1]
            next_positions[row] = len(prompts[row]) + len(tokens[row]) - 1
        if all(finished):
            break
        step += 1
        ids = torch.tensor(next_ids, device=device)[:, None]
        mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = torch.tensor(next_positions, device=device)[:, None]
    return [
        Decoded(
            tokens[row],
            logprobs[row],
            torch.stack(attention[row], dim=1).cpu().numpy()
            if attention[row]
            else np.zeros((len(heads), 0, 0), np.float32),
        )
        for row in range(rows)
    ]
