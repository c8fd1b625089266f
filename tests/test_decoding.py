"""The encoder on sized windows and the step-by-step greedy decoder, against transformers' own."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

from real_time_audio.config import Settings
from real_time_audio.service import TranscriptionRequest
from real_time_audio.whisper.backend import WhisperBackend
from real_time_audio.whisper.decoding import (
    DIGITAL_SILENCE_LEVEL,
    Silence,
    Spread,
    cross_attention,
    encode_sized,
    first_step,
    greedy_decode,
    padding_level,
    sized_window_s,
)
from tests.conftest import speech_like


@pytest.fixture(scope="module")
def backend(checkpoint_dir: Path) -> WhisperBackend:
    return WhisperBackend.load(Settings(transcription_model_id=str(checkpoint_dir), warmup=False))


def special_ids(backend: WhisperBackend) -> tuple[int, list[int]]:
    """<|startofprev|>, and the start of an English transcript without timestamps."""
    generation = backend.model.generation_config
    start = [
        generation.decoder_start_token_id,
        generation.lang_to_id["<|en|>"],
        generation.task_to_id["transcribe"],
        generation.no_timestamps_token_id,
    ]
    return backend.processor.tokenizer.convert_tokens_to_ids("<|startofprev|>"), start


def features(backend: WhisperBackend, clips: list[np.ndarray]) -> torch.Tensor:
    extracted = backend.processor.feature_extractor(clips, sampling_rate=16000, return_tensors="pt")
    return extracted.input_features


@pytest.mark.parametrize(
    ("longest", "pad", "bucket", "window"),
    [(0.2, 5, 1, 6), (3.0, 5, 1, 8), (3.01, 5, 1, 9), (3.5, 5, 2, 10), (24.5, 5, 1, 30), (40, 5, 1, 30)],
)
def test_sized_window_is_the_audio_plus_the_pad_in_whole_buckets(
    longest: float, pad: float, bucket: float, window: float
) -> None:
    assert sized_window_s(longest, pad, bucket) == window


def test_a_full_length_sized_encoding_is_the_encoder_output(backend: WhisperBackend) -> None:
    """On a whole 30 s window, the sized forward pass is transformers' encoder, to float rounding."""
    mel = features(backend, [speech_like(5, 4.0), speech_like(6, 2.0)])
    encoder = backend.model.get_encoder()
    with torch.inference_mode():
        expected = encoder(mel).last_hidden_state
        got = encode_sized(encoder, mel)
        with pytest.raises(ValueError, match="more than the encoder's window"):
            encode_sized(encoder, torch.cat([mel, mel], dim=-1))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_sized_window_that_computes_all_its_padding_is_the_whole_window(backend: WhisperBackend) -> None:
    """With every padding frame computed (stride 1), nothing is taken from the silences: the sized
    encoding and its cross-attention keys and values are the whole window's, for a loud and a soft
    clip together, whatever silences stand in. The decoder's first step reads them as
    transformers' model reads the whole encoding."""
    model = backend.model
    encoder = model.get_encoder()
    mel = features(backend, [speech_like(5, 4.0), speech_like(7, 1.0) * 0.05])
    with torch.inference_mode():
        quiet, loud = Silence.of(model, -1.5), Silence.of(model, -0.7)
        full = encoder(mel).last_hidden_state
        sized = encode_sized(encoder, mel, 400, [quiet, loud], stride=1)  # 8 s, then 22 s of padding computed
        assert sized.spread.positions == list(range(400, 1500))
        torch.testing.assert_close(sized.encoded, full[:, :400], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sized.padding, full[:, 400:], rtol=1e-4, atol=1e-4)
        states, expected = cross_attention(model, sized), cross_attention(model, full)
        layer = model.get_decoder().layers[1].encoder_attn
        assert states[1][0].shape == (2, layer.num_heads, 1500, layer.head_dim)
        for (keys, values), (want_keys, want_values) in zip(states, expected, strict=True):
            torch.testing.assert_close(keys, want_keys, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(values, want_values, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(quiet.keys[1], loud.keys[1], atol=1e-3)  # the level is heard
        sot = model.generation_config.decoder_start_token_id
        logits = model(encoder_outputs=(full,), decoder_input_ids=torch.full((2, 1), sot)).logits[:, -1]
        torch.testing.assert_close(first_step(model, states, sot), logits, rtol=1e-4, atol=1e-4)


def test_the_padding_between_computed_frames_is_the_silence_plus_a_spread_correction() -> None:
    """Computed frames keep their own keys; between the evenly spaced anchors the difference from
    the silence is interpolated linearly; a sink is computed but never an anchor, so its
    neighbours do not take its (large) correction."""
    spread = Spread.of(frames=10, window=30, stride=5, sinks=[17])
    assert spread.anchors == [10, 15, 20, 25, 29]
    assert spread.positions == [10, 15, 17, 20, 25, 29]
    silence = torch.arange(30, dtype=torch.float32).reshape(1, 30, 1) * 0.1  # heads × frames × size
    correction = {10: 1.0, 15: 2.0, 17: 100.0, 20: 4.0, 25: 4.0, 29: 0.0}
    computed = torch.tensor([silence[0, p, 0] + correction[p] for p in spread.positions]).reshape(1, 1, -1, 1)
    filled = spread.fill(computed, [silence])[0, 0, :, 0] - silence[0, 10:, 0]
    expected = [1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.4, 100.0, 3.2, 3.6, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    torch.testing.assert_close(filled, torch.tensor(expected), rtol=0, atol=1e-5)


def test_a_sized_window_attends_to_its_own_silence_as_the_whole_window_would(backend: WhisperBackend) -> None:
    """In a one-layer encoder the padding's keys and values depend on the padding alone, so a sized
    window that reads its silence's past its end is exactly the whole window's encoding of its
    frames, for a loud and a soft clip together (each with its own padding level). Without the
    silence, or with the other row's, it is not."""
    model = copy.deepcopy(backend.model)
    encoder = model.get_encoder()
    encoder.layers = encoder.layers[:1]
    mel = features(backend, [speech_like(5, 4.0), speech_like(6, 2.0) * 0.05])
    levels = padding_level(mel)
    assert levels[0] > levels[1] > DIGITAL_SILENCE_LEVEL
    with torch.inference_mode():
        tails = [Silence.of(model, level) for level in levels]
        expected = encoder(mel).last_hidden_state[:, :300]
        got = encode_sized(encoder, mel, 300, tails, stride=10**6)  # 6 s: the speech, then padding
        torch.testing.assert_close(got.encoded, expected, rtol=1e-5, atol=1e-5)
        swapped = encode_sized(encoder, mel, 300, tails[::-1], stride=10**6).encoded
        for wrong in (encode_sized(encoder, mel, 300), swapped):
            assert (wrong - expected).abs().max() > 5e-4  # fifty times the tolerance


def test_the_padding_level_follows_the_loudest_sound_in_the_window(backend: WhisperBackend) -> None:
    """Digital silence pads at -1.5; louder speech raises the floor its padding is clipped to."""
    quiet = np.zeros(16000, np.float32)
    soft, loud = speech_like(3, 2.0) * 0.05, speech_like(3, 2.0)
    levels = padding_level(features(backend, [quiet, soft, loud]))
    assert levels[0] == DIGITAL_SILENCE_LEVEL == -1.5
    assert -1.5 < levels[1] < levels[2] < 0
    mel = features(backend, [loud])
    assert float(mel[0, :, -400:].min()) == float(mel[0, :, -400:].max()) == pytest.approx(levels[2])


def test_greedy_decode_writes_what_generate_writes(backend: WhisperBackend) -> None:
    """Rows with prompts of different lengths (left-padded into one call) get the tokens that
    transformers' generate gives each of them alone."""
    model = backend.model
    generation = model.generation_config
    clips = [speech_like(21, 2.0), speech_like(22, 3.0), speech_like(23, 1.0)]
    prev, start = special_ids(backend)
    prompts = [
        start,
        [prev, 300, 301, 302, 303, *start],
        [prev, 400, *start],
    ]
    mel = features(backend, clips)
    with torch.inference_mode():
        encoded = model.get_encoder()(mel).last_hidden_state
        ours = greedy_decode(
            model,
            cross_attention(model, encoded),
            prompts,
            [0, 0, 0],
            12,
            pad=generation.pad_token_id,
            eot=generation.eos_token_id,
            suppress=list(generation.suppress_tokens or []),
            begin_suppress=list(generation.begin_suppress_tokens or []),
            heads=generation.alignment_heads,
        )
        for row, prompt in enumerate(prompts):
            theirs = model.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoded[row : row + 1]),
                decoder_input_ids=torch.tensor([prompt]),
                max_new_tokens=12,
                force_unique_generate_call=True,
            )
            generated = theirs[0, len(prompt) :].tolist()
            eot = generation.eos_token_id
            expected = generated[: generated.index(eot) + 1] if eot in generated else generated
            assert ours[row].tokens == expected
            assert len(ours[row].logprobs) == len(expected)
            heads = len(generation.alignment_heads)
            assert ours[row].attention.shape == (heads, len(expected), 1500)


def test_sized_windows_serve_the_same_request_shape(checkpoint_dir: Path) -> None:
    """ENCODER_WINDOW=sized decodes through the silence-continued encoding: results keep their form
    (timed words inside the clip), and a whole-window clip gives exactly the full-window text."""
    sized = WhisperBackend.load(
        Settings(transcription_model_id=str(checkpoint_dir), warmup=False, encoder_window="sized")
    )
    full = WhisperBackend.load(Settings(transcription_model_id=str(checkpoint_dir), warmup=False))
    long_clip = speech_like(8, 26.0)  # 26 s + 5 s of pad: the whole 30 s window
    assert [r.text for r in sized.transcribe_batch([TranscriptionRequest(audio=long_clip)])] == [
        r.text for r in full.transcribe_batch([TranscriptionRequest(audio=long_clip)])
    ]
    result = sized.transcribe_batch([TranscriptionRequest(audio=speech_like(9, 2.0))])[0]
    assert result.words and " ".join(w.text for w in result.words) == result.text
    assert all(0.0 <= w.start <= w.end <= 2.0 for w in result.words)


def test_rows_heard_in_different_windows_share_a_batch(checkpoint_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENCODER_WINDOW=partials: partial rows are encoded sized and final rows whole, in one batch
    whose rows each get what they get alone (two of them in one window, at different padding levels)."""
    backend = WhisperBackend.load(
        Settings(transcription_model_id=str(checkpoint_dir), warmup=False, encoder_window="partials", encoder_pad_s=2)
    )
    requests = [
        TranscriptionRequest(audio=speech_like(31, 2.0), is_final=False),
        TranscriptionRequest(audio=speech_like(32, 3.0), is_final=True),
        TranscriptionRequest(audio=speech_like(33, 9.0), is_final=False),
        TranscriptionRequest(audio=speech_like(34, 1.5) * 0.05, is_final=False),  # softer: its own padding level
    ]
    assert list(backend._silences) == [-15, -10, -9, -8, -7, -6, -5, -4]  # at load, not in the first partials
    alone = [backend.transcribe_batch([r])[0].text for r in requests]
    windows: list[tuple[int, float]] = []
    encode = backend._cross_attention

    def spy(features: torch.Tensor, window_s: float, interrupt: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
        windows.append((len(features), window_s))
        return encode(features, window_s, interrupt)  # type: ignore[arg-type]

    monkeypatch.setattr(backend, "_cross_attention", spy)
    together = [r.text for r in backend.transcribe_batch(requests)]
    assert together == alone
    assert len(set(alone)) == 4
    assert windows == [(2, 4.0), (1, 11.0), (1, 30.0)]


def test_a_draft_changes_the_number_of_steps_never_the_tokens(
    backend: WhisperBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows with a right draft, a half-right one, a wrong one and none (one with a forced prefix)
    get exactly the tokens, scores and attention rows of the decode without drafts; alone, the
    right draft needs at most two decoder calls instead of one per token."""
    model = backend.model
    generation = model.generation_config
    prev, start = special_ids(backend)
    prompts = [
        start,
        [prev, 300, 301, 302, *start],
        [*start, 500, 501],  # two forced prefix tokens
        [prev, 400, *start],
    ]
    prefixes = [0, 0, 2, 0]
    mel = features(backend, [speech_like(41, 2.0), speech_like(42, 3.0), speech_like(43, 1.5), speech_like(44, 2.5)])
    options = {
        "pad": generation.pad_token_id,
        "eot": generation.eos_token_id,
        "suppress": list(generation.suppress_tokens or []),
        "begin_suppress": list(generation.begin_suppress_tokens or []),
        "heads": generation.alignment_heads,
    }
    calls = []
    decoder = model.get_decoder()
    forward = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    with torch.inference_mode():
        cross = cross_attention(model, model.get_encoder()(mel).last_hidden_state)
        plain = greedy_decode(model, cross, prompts, prefixes, 10, **options)
        plain_calls = len(calls)
        right = [t for t in plain[0].tokens if t != generation.eos_token_id]
        half = [*plain[1].tokens[:3], 7, 8, 9]
        drafts = [right, half, [11, 12, 13], []]
        calls.clear()
        drafted = greedy_decode(model, cross, prompts, prefixes, 10, drafts=drafts, **options)
        drafted_calls = len(calls)
        calls.clear()
        alone = greedy_decode(
            model, cross[:1] and [(k[:1], v[:1]) for k, v in cross], prompts[:1], [0], 10, drafts=[right], **options
        )
    assert len(plain[0].tokens) > 3  # the test means something: row 0 writes several tokens
    for a, b in zip(plain, drafted, strict=True):
        assert b.tokens == a.tokens
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4)
        np.testing.assert_allclose(b.attention, a.attention, atol=1e-4)
    assert drafted_calls == plain_calls  # the batch goes on as long as its longest row
    assert alone[0].tokens == plain[0].tokens
    assert len(calls) == (1 if len(right) + 1 >= 10 else 2)  # the draft and its next token, then the end


@pytest.mark.parametrize(("limit", "forced", "written"), [(10, 3, 3), (5, 8, 5)])
def test_forced_tokens_write_exactly_that_many_within_the_limit(
    backend: WhisperBackend, limit: int, forced: int, written: int
) -> None:
    """A capacity measurement's rows write `forced` tokens (end-of-text blocked), never past the limit."""
    model = backend.model
    generation = model.generation_config
    prompt = [generation.decoder_start_token_id, generation.no_timestamps_token_id]
    with torch.inference_mode():
        cross = cross_attention(
            model, model.get_encoder()(features(backend, [speech_like(51, 1.0)] * 2)).last_hidden_state
        )
        rows = greedy_decode(
            model,
            cross,
            [prompt, prompt],
            [0, 0],
            limit,
            pad=generation.pad_token_id,
            eot=generation.eos_token_id,
            suppress=[],
            begin_suppress=[],
            heads=generation.alignment_heads,
            forced_tokens=forced,
        )
    assert [len(r.tokens) for r in rows] == [written, written]
    assert all(generation.eos_token_id not in r.tokens for r in rows)


def test_a_word_is_as_probable_as_its_least_likely_token(backend: WhisperBackend) -> None:
    """Tokens become words with the probability of their least likely token; after a forced prefix
    the scores count only the generated tokens, and the end-of-text token belongs to no word."""
    tokenizer = backend.processor.tokenizer
    eot = backend.model.generation_config.eos_token_id
    text = tokenizer.encode(" the Criccorpus.", add_special_tokens=False)
    prefix = tokenizer.encode(" So", add_special_tokens=False)
    pieces = tokenizer.convert_ids_to_tokens(text)
    second = next(i for i, piece in enumerate(pieces) if i and piece.startswith("\u0120"))  # where " C" begins
    lowest = {0: -0.7, second + 1: -2.5}  # one token in each word scores low; the rest -0.1
    logprobs = [lowest.get(i, -0.1) for i in range(len(text))] + [-4.0]  # the last: end-of-text
    heads = len(backend.model.generation_config.alignment_heads)
    rows = len(prefix) + len(text) + 1
    attention = np.zeros((heads, rows, 1500), dtype=np.float32)
    for row in range(rows):
        attention[:, row, 10 * row] = 1.0
    result = backend._result([*text, eot], attention, logprobs, 100, "en", None, prefix=len(prefix))
    assert [w.text for w in result.words] == ["the", "Criccorpus."]
    assert [w.probability for w in result.words] == [round(float(np.exp(-0.7)), 4), round(float(np.exp(-2.5)), 4)]
