"""The Whisper backend: a Hugging Face Whisper model run on batches of requests, and the
transformers side of converting a faster-whisper folder. This module and whisper/decoding.py
are the only ones that import transformers (lazily, so that importing them never touches CUDA).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from real_time_audio.audio.pcm import MODEL_SAMPLE_RATE
from real_time_audio.service import TranscriptionEngine, TranscriptionRequest, TranscriptionResult, Word
from real_time_audio.whisper.alignment import token_start_times
from real_time_audio.whisper.ct2 import (
    CONVERTER_VERSION,
    Ct2FormatError,
    generation_config,
    model_bin_parts,
    read_header_version,
    read_model_bin,
    storage_dtype,
    to_state_dict,
    write_tokenizer,
)
from real_time_audio.whisper.decoding import (
    DIGITAL_SILENCE_LEVEL,
    FRAMES_PER_SECOND,
    FULL_WINDOW_S,
    MEL_FRAMES_PER_FRAME,
    Silence,
    check,
    cross_attention,
    encode_sized,
    first_step,
    greedy_decode,
    join_rows,
    padding_level,
    sized_window_s,
)
from real_time_audio.whisper.source import ModelLoadError, ModelLocation, locate

if TYPE_CHECKING:
    from real_time_audio.config import Settings

logger = logging.getLogger(__name__)

MAX_TARGET_TOKENS = 448  # Whisper's decoder context
TOKEN_ALLOWANCE = 8  # extra tokens on top of the per-second cap, for very short clips
MAX_PROMPT_TOKENS = 200
MAX_PREFIX_TOKENS = 160  # a longer prefix is dropped (the policy keeps it far shorter)
MAX_DRAFT_TOKENS = 96  # of a draft, only this many tokens are checked at once
WINDOW_BUCKET_S = 1.0  # sized encoder windows come in whole seconds
SILENCE_LEVEL_STEP = 0.1  # padding levels this close share one silent window (normalized log-mel)
SILENCES_KEPT = 8  # silent windows kept, the most recently used (speech pads at -1.5 to about -0.3)
SPEECH_PADDING_LEVELS = (DIGITAL_SILENCE_LEVEL, -1.0, -0.9, -0.8, -0.7, -0.6, -0.5, -0.4)  # computed at load
WORD_START = "\u0120"  # how byte-level BPE marks a token that begins with a space


def token_cap(duration_s: float, tokens_per_second: float) -> int:
    """Most tokens a clip of this length may produce: proportional to its duration."""
    return math.ceil(duration_s * tokens_per_second) + TOKEN_ALLOWANCE


def resolve_device(setting: str) -> tuple[str, str]:
    """Pick the device from the DEVICE setting; returns (device, reason for the log)."""
    import torch

    if setting == "cpu":
        return "cpu", "DEVICE=cpu"
    if not torch.cuda.is_available():
        if setting == "auto":
            return "cpu", "no CUDA device is available"
        raise ModelLoadError(f"DEVICE={setting} but CUDA is not available to torch {torch.__version__}")
    index = int(setting.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ModelLoadError(f"DEVICE={setting} but only {torch.cuda.device_count()} CUDA device(s) exist")
    name = torch.cuda.get_device_name(index)
    why = "CUDA is available" if setting == "auto" else f"DEVICE={setting}"
    return f"cuda:{index}", f"{why} ({name})"


class WhisperBackend:
    """A Hugging Face Whisper model and its processor, run on batches (whisper/decoding.py).

    Each row of a batch has its own decoder prompt (context text, language), left-padded to a
    common length, so sessions with different contexts and languages still share one model call.
    Every result carries word timings (cross-attention alignment), its average log-probability
    and the no-speech probability, which the streaming policy's guards use.
    """

    @property
    def requested_model(self) -> str:
        """TRANSCRIPTION_MODEL_ID as configured (differs from `model_id` when the fallback serves)."""
        return self.location.requested if self.location else self.model_id

    @property
    def fallback_reason(self) -> str | None:
        return self.location.fallback_reason if self.location else None

    def __init__(
        self,
        model_id: str,
        device: str,
        dtype: Any,
        model: Any,
        processor: Any,
        tokens_per_second: float,
        encoder_window: str = "full",
        encoder_pad_s: float = 1.0,
        workers: int = 1,
        threads: int = 0,
    ) -> None:
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.model = model
        self.processor = processor
        self.tokens_per_second = tokens_per_second
        self.encoder_window = encoder_window
        self.encoder_pad_s = encoder_pad_s
        self.workers = workers  # inference workers the engine should run
        self.threads = threads  # torch threads per inference worker on the CPU (0: torch's default)
        self.preempt_partials = False  # a final may stop a batch of partials (the engine's `preempt`)
        self._silences: OrderedDict[int, Silence] = OrderedDict()  # tails of sized windows, by padding level
        self._silences_lock = threading.Lock()
        self._sinks: list[int] | None = None  # padding frames a sized window always computes
        self.location: ModelLocation | None = None  # where `load` found the weights
        self.quantization: str | None = None  # "int8" when the linear layers run quantized (CPU)
        self._forced_tokens: int | None = None  # set only while `measure` runs
        tokenizer = processor.tokenizer
        generation = model.generation_config
        self.multilingual = bool(getattr(generation, "is_multilingual", False))
        lang_to_id: dict[str, int] = getattr(generation, "lang_to_id", None) or {}
        self._id_to_language = {token_id: token[2:-2] for token, token_id in lang_to_id.items()}
        self._language_ids = sorted(self._id_to_language)
        self._task_ids: dict[str, int] = getattr(generation, "task_to_id", None) or {}
        self.languages: frozenset[str] | None = (
            frozenset(self._id_to_language.values()) if self.multilingual else frozenset({"en"})
        )
        self._sot = generation.decoder_start_token_id
        self._no_timestamps = generation.no_timestamps_token_id
        self._startofprev = processor.tokenizer.convert_tokens_to_ids("<|startofprev|>")
        self._pad = generation.pad_token_id if generation.pad_token_id is not None else generation.eos_token_id
        self._eot = generation.eos_token_id if isinstance(generation.eos_token_id, int) else None
        self._special_ids = frozenset(tokenizer.all_special_ids)
        self._no_speech = next(
            (
                token_id
                for name in ("<|nospeech|>", "<|nocaptions|>")
                if (token_id := tokenizer.convert_tokens_to_ids(name)) not in (None, tokenizer.unk_token_id)
            ),
            None,
        )
        if not getattr(generation, "alignment_heads", None):
            # No published alignment heads: use every head of the upper half of the decoder.
            layers, heads = model.config.decoder_layers, model.config.decoder_attention_heads
            generation.alignment_heads = [
                [layer, head] for layer in range(layers // 2, layers) for head in range(heads)
            ]
        # Real checkpoints set max_length=448; we always pass max_new_tokens instead.
        generation.max_length = None
        self._decoder_returns_attention()

    def _decoder_returns_attention(self) -> None:
        """Run the decoder with eager attention, which returns the cross-attention weights that word
        timing needs; the encoder, where nearly all the compute is, keeps its fast kernel."""
        decoder = self.model.get_decoder()
        if self.model.config._attn_implementation == "eager":
            return
        eager = copy.copy(self.model.config)
        eager._attn_implementation = "eager"
        for module in decoder.modules():
            if getattr(module, "config", None) is self.model.config:
                module.config = eager

    @classmethod
    def load(cls, settings: Settings) -> WhisperBackend:
        """Load the model once, on the configured device, through `from_pretrained`."""
        import torch
        from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor
        from transformers.utils import logging as transformers_logging

        # We pass max_new_tokens and our own decoder prompts on purpose; transformers' advice
        # about them would repeat on every call.
        for name in ("transformers.generation.utils", "transformers.generation.configuration_utils"):
            logging.getLogger(name).setLevel(logging.ERROR)
        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # a server's log is one line per event
        device, reason = resolve_device(settings.device)
        dtype_name = settings.torch_dtype
        if dtype_name == "auto":
            dtype_name = "float16" if device.startswith("cuda") else "float32"
        dtype = getattr(torch, dtype_name)
        logger.info("using device %s because %s; weights in %s", device, reason, dtype_name)

        location = locate(settings)
        options: dict[str, Any] = {"local_files_only": location.local_files_only}
        source = location.source
        started = time.perf_counter()
        try:
            processor = AutoProcessor.from_pretrained(source, **options)  # type: ignore[no-untyped-call]
            model = AutoModelForSpeechSeq2Seq.from_pretrained(source, dtype=dtype, **options)
        except (OSError, ValueError) as exc:
            requested = location.requested
            raise ModelLoadError(f"cannot load TRANSCRIPTION_MODEL_ID={requested!r} from {source}: {exc}") from exc
        model = model.to(device).eval()
        logger.info("loaded %s from %s in %.1f s", location.name, source, time.perf_counter() - started)
        quantization: str | None = None
        if settings.quantization == "int8":
            if device == "cpu":
                quantized = quantize_int8(model)
                quantization = "int8"
                logger.info("int8: %d linear layers run as int8 matrix products", quantized)
            else:
                logger.warning("QUANTIZATION=int8 is for the CPU; on %s the weights stay in %s", device, dtype_name)
        window = settings.encoder_window
        if window == "auto":  # the CPU spends most of a decode in the encoder; a GPU batches whole windows
            window = "sized" if device == "cpu" else "full"
        logger.info("encoder windows: %s", window)
        backend = cls(
            location.name,
            device,
            dtype,
            model,
            processor,
            settings.tokens_per_second,
            window,
            settings.encoder_pad_s,
            *worker_threads(settings, device, torch.get_num_threads()),
        )
        backend.location = location
        backend.quantization = quantization
        preempt = settings.preempt_partials
        backend.preempt_partials = device == "cpu" if preempt == "auto" else preempt
        if window != "full":  # at start-up, not in the first users' decodes
            backend._padding_sinks()
        return backend

    def prepare_worker(self) -> None:
        """Called first in each inference worker thread: torch's thread count is per calling thread."""
        if self.threads and self.device == "cpu":
            import torch

            torch.set_num_threads(self.threads)

    def _text_ids(self, text: str) -> list[int]:
        """Token ids of `text` as plain text: a client's "<|endoftext|>" is spelled out, never the
        special token (which would end or derail the decode of every row in the batch)."""
        tokenizer = self.processor.tokenizer
        ids: list[int] = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        special = self._special_ids
        return [i for i in ids if i not in special]

    def _prompt_ids(self, prompt: str | None) -> list[int]:
        """<|startofprev|> and the prompt's most recent MAX_PROMPT_TOKENS tokens (none without a prompt)."""
        if not prompt or not prompt.strip():
            return []
        ids = self._text_ids(" " + prompt.strip())[-MAX_PROMPT_TOKENS:]
        return [self._startofprev, *ids] if ids else []

    def _prefix_ids(self, prefix: str | None) -> list[int]:
        """The committed words the decoder must start with (none when absent or too long)."""
        if not prefix or not prefix.strip():
            return []
        ids = self._text_ids(" " + prefix.strip())
        return ids if len(ids) <= MAX_PREFIX_TOKENS else []

    def _decoder_prompt(self, request: TranscriptionRequest, language: str | None) -> tuple[list[int], int]:
        """The decoder's input ids, and how many of them at the end are the forced prefix."""
        ids = [*self._prompt_ids(request.prompt), self._sot]
        if self.multilingual:
            if language is not None:
                ids.append(self.model.generation_config.lang_to_id[f"<|{language}|>"])
            ids.append(self._task_ids[request.task])
        ids.append(self._no_timestamps)
        prefix = self._prefix_ids(request.prefix)
        return ids + prefix, len(prefix)

    def measure(self, window_s: float, rows: int, tokens: int) -> float:
        """Wall seconds of one call like a live one: `rows` windows of `window_s` seconds, each made
        to write `tokens` tokens (feature extraction, encoder, generation and word timing)."""
        noise = np.random.default_rng(1).standard_normal(int(window_s * MODEL_SAMPLE_RATE)).astype(np.float32) * 0.05
        requests = [
            TranscriptionRequest(audio=noise, language=None if self.multilingual else "en") for _ in range(rows)
        ]
        self._forced_tokens = tokens
        try:
            started = time.perf_counter()
            self.transcribe_batch(requests)
            return time.perf_counter() - started
        finally:
            self._forced_tokens = None

    def transcribe_batch(
        self, requests: Sequence[TranscriptionRequest], interrupt: Callable[[], bool] | None = None
    ) -> list[TranscriptionResult]:
        """One batched feature extraction, encoder pass and greedy decode for all requests (same
        task). `interrupt`: the engine's request for this worker back; when it turns true, the
        call raises `Interrupted` before its next model call (an encoder layer or decoder step)."""
        import torch

        features = self.processor.feature_extractor(
            [r.audio for r in requests],
            sampling_rate=MODEL_SAMPLE_RATE,
            return_tensors="pt",
            return_attention_mask=True,
        )
        input_features = features.input_features.to(self.device, self.dtype)
        windows = [self._window_s(r) for r in requests]
        with torch.inference_mode():
            # Rows are encoded in groups of one window length, then joined back in their order.
            order = sorted(range(len(requests)), key=lambda i: windows[i])
            groups: list[list[tuple[Any, Any]]] = []
            placed: list[int] = []
            for window_s, members in itertools.groupby(order, key=lambda i: windows[i]):
                rows = list(members)
                placed += rows
                groups.append(self._cross_attention(input_features[rows], window_s, interrupt))
            cross = join_rows(groups)
            if placed != list(range(len(requests))):
                back = torch.tensor([placed.index(i) for i in range(len(requests))], device=self.device)
                cross = [(k.index_select(0, back), v.index_select(0, back)) for k, v in cross]
            # One decoder step on <|startoftranscript|> gives both the no-speech probability and,
            # for rows without a language, the detected language.
            check(interrupt)
            first = first_step(self.model, cross, self._sot)
            probabilities = first.softmax(dim=-1)
            no_speech = (
                probabilities[:, self._no_speech].tolist() if self._no_speech is not None else [None] * len(requests)
            )
            languages = [r.language for r in requests]
            if self.multilingual and any(language is None for language in languages):
                detected = first[:, self._language_ids].argmax(dim=-1).tolist()
                languages = [
                    language or self._id_to_language[self._language_ids[index]]
                    for language, index in zip(languages, detected, strict=True)
                ]
            elif not self.multilingual:
                languages = ["en"] * len(requests)
            built = [self._decoder_prompt(r, lang) for r, lang in zip(requests, languages, strict=True)]
            prompts = [ids for ids, _ in built]
            prefixes = [count for _, count in built]
            width = max(len(p) for p in prompts)
            caps = [token_cap(r.duration, self.tokens_per_second) for r in requests]
            generation = self.model.generation_config
            decoded = greedy_decode(
                self.model,
                cross,
                prompts,
                prefixes,
                max(1, min(max(caps), MAX_TARGET_TOKENS - width - 1)),
                pad=self._pad,
                eot=self._eot if self._eot is not None else self._pad,
                suppress=list(generation.suppress_tokens or []),
                begin_suppress=list(generation.begin_suppress_tokens or []),
                heads=generation.alignment_heads,
                drafts=[self._text_ids(" " + r.draft)[:MAX_DRAFT_TOKENS] if r.draft else [] for r in requests],
                forced_tokens=self._forced_tokens,
                interrupt=interrupt,
            )
        frames = (features.attention_mask.sum(dim=-1) // MEL_FRAMES_PER_FRAME).tolist()  # encoder frames of each clip
        return [
            self._result(
                row.tokens,
                row.attention[..., : frames[index]],
                row.logprobs,
                caps[index],
                languages[index],
                no_speech[index],
                prefixes[index],
            )
            for index, row in enumerate(decoded)
        ]

    def _window_s(self, request: TranscriptionRequest) -> float:
        """The encoder window a request is heard in: 30 s, or sized to its audio."""
        sized = self.encoder_window == "sized" or (self.encoder_window == "partials" and not request.is_final)
        return sized_window_s(request.duration, self.encoder_pad_s, WINDOW_BUCKET_S) if sized else FULL_WINDOW_S

    def _cross_attention(
        self, features: Any, window_s: float, interrupt: Callable[[], bool] | None = None
    ) -> list[tuple[Any, Any]]:
        """Encode rows of mel features in a window of `window_s` seconds; their cross-attention states."""
        check(interrupt)
        if window_s >= FULL_WINDOW_S:
            return cross_attention(self.model, self.model.get_encoder()(features).last_hidden_state)
        frames = round(window_s * FRAMES_PER_SECOND)
        tails = [self._silence_at(level) for level in padding_level(features)]
        encoded = encode_sized(
            self.model.get_encoder(), features, frames, tails, sinks=self._padding_sinks(), interrupt=interrupt
        )
        return cross_attention(self.model, encoded)

    def _padding_sinks(self) -> list[int]:
        """The sinks of the silent windows at SPEECH_PADDING_LEVELS, together: the same for every
        sized window, so that a row is encoded the same whatever else is in its batch."""
        if self._sinks is None:
            self._sinks = sorted({p for level in SPEECH_PADDING_LEVELS for p in self._silence_at(level).sinks})
        return self._sinks

    def _silence_at(self, level: float) -> Silence:
        """The silent window at `level` (to SILENCE_LEVEL_STEP): computed when first asked, and one
        of the SILENCES_KEPT most recently used."""
        key = round(level / SILENCE_LEVEL_STEP)
        with self._silences_lock:
            silence = self._silences.get(key)
            if silence is not None:
                self._silences.move_to_end(key)
                return silence
        import torch

        with torch.inference_mode():
            silence = Silence.of(self.model, key * SILENCE_LEVEL_STEP, self.device, self.dtype)
        with self._silences_lock:
            self._silences[key] = silence
            while len(self._silences) > SILENCES_KEPT:
                self._silences.popitem(last=False)
        return silence

    def _result(
        self,
        tokens: list[int],
        attention: NDArray[np.float32],
        logprobs: list[float],
        cap: int,
        language: str | None,
        no_speech: float | None,
        prefix: int = 0,
    ) -> TranscriptionResult:
        """Cut at end-of-text and at the cap; group tokens into timed words; score the decode.

        `attention` holds the `prefix` forced tokens' rows first, then the generated tokens' rows;
        only the generated tokens become words, timed against the prefix's as well.
        """
        length = tokens.index(self._eot) if self._eot is not None and self._eot in tokens else len(tokens)
        scored = logprobs[: min(length + 1, len(logprobs))]  # Whisper counts the end-of-text token too
        avg_logprob = sum(scored) / max(1, len(scored))
        truncated = length > cap
        length = min(length, cap)
        kept = [(prefix + i, t) for i, t in enumerate(tokens[:length]) if t not in self._special_ids]
        aligned = min(prefix + len(scored), attention.shape[1])  # prefix, text tokens and end-of-text
        times = token_start_times(attention[:, :aligned].astype(np.float64)).tolist() if kept else []
        words = self._words(kept, times, logprobs, prefix)
        if prefix and kept and not self.processor.tokenizer.convert_ids_to_tokens(kept[0][1]).startswith(WORD_START):
            words = words[1:]  # punctuation that would belong to a committed word, which can no longer change
        text = self.processor.tokenizer.decode([t for _, t in kept]).strip()
        return TranscriptionResult(
            text=text,
            language=language,
            tokens=length,
            truncated=truncated,
            words=words,
            avg_logprob=avg_logprob,
            no_speech_prob=no_speech,
            after_prefix=prefix > 0,
        )

    def _words(self, kept: list[tuple[int, int]], times: list[float], logprobs: list[float], prefix: int) -> list[Word]:
        """Group byte-level BPE tokens into words (a leading space starts one) with their times and
        the probability of their least likely token (`kept` indexes count the `prefix` tokens,
        `logprobs` only the generated ones)."""
        if not kept or not times:
            return []
        tokenizer = self.processor.tokenizer
        pieces = tokenizer.convert_ids_to_tokens([t for _, t in kept])
        groups: list[list[tuple[int, int]]] = []
        for (index, token), piece in zip(kept, pieces, strict=True):
            if not groups or piece.startswith(WORD_START):
                groups.append([])
            groups[-1].append((index, token))
        words: list[Word] = []
        for group in groups:
            text = tokenizer.decode([t for _, t in group]).strip()
            if not text:
                continue
            first, last = group[0][0], group[-1][0]
            start = times[first] if first < len(times) else times[-1]
            end = times[last + 1] if last + 1 < len(times) else times[-1]
            scores = [logprobs[i - prefix] for i, _ in group if 0 <= i - prefix < len(logprobs)]
            probability = round(math.exp(min(scores)), 4) if scores else 1.0
            words.append(Word(text, round(start, 3), round(max(start, end), 3), probability))
        return words


def quantize_int8(model: Any, include: Callable[[str], bool] | None = None) -> int:
    """Replace every linear layer of `model` (encoder, decoder, vocabulary projection), or those whose
    names `include` accepts, by one that keeps its weights in int8, per output channel, and
    quantizes its input per call (PyTorch's fbgemm kernels, which round inputs to 7 bits so that
    CPUs without VNNI cannot overflow). Returns how many layers were replaced. The convolutions, norms, embeddings
    and attention products stay in float32."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # PyTorch points eager quantization at torchao; torchao's int8 path is an order of
        # magnitude slower on the CPU without torch.compile, so this stays the right tool here.
        warnings.filterwarnings("ignore", message=".*quantiz", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*quantiz", category=DeprecationWarning)
        linear = {
            name
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and (include is None or include(name))
        }
        quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in linear}, inplace=True)  # type: ignore[no-untyped-call]
    return len(linear)


def worker_threads(settings: Settings, device: str, cores: int) -> tuple[int, int]:
    """Inference workers and torch threads per worker (0: torch's default) for `device`, from
    INFERENCE_WORKERS and INFERENCE_THREADS: by default 1 worker on a GPU; 2 on the CPU, sharing
    torch's `cores` threads."""
    cpu = device == "cpu"
    workers = settings.inference_workers
    if workers == "auto":
        workers = 2 if cpu else 1
    if not cpu:
        return workers, 0
    threads = settings.inference_threads
    return workers, max(1, cores // workers) if threads == "auto" else threads


def load_engine(settings: Settings) -> TranscriptionEngine:
    """The server's engine: the configured Whisper model behind the batching scheduler."""
    return TranscriptionEngine(
        lambda: WhisperBackend.load(settings),
        batch_max_size=settings.batch_max_size,
        batch_wait_ms=settings.batch_wait_ms,
        queue_max_size=settings.queue_max_size,
        workers=None,  # the backend's: INFERENCE_WORKERS resolved for its device (`worker_threads`)
        warmup=settings.warmup,
    )


def write_transformers_folder(source: Path, out: Path) -> dict[str, Any]:
    """Convert the CTranslate2 folder `source` into `out` and verify it; returns what was done.

    `out` must be empty or absent. Every tensor written is read back and compared with the source,
    and transformers must load the folder with no missing or unexpected weights.
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    parts = model_bin_parts(source)
    if not parts:
        raise Ct2FormatError(f"{source} has no model.bin")
    try:
        source_config: dict[str, Any] = json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Ct2FormatError(f"config.json is missing or unreadable: {exc}") from None
    model = read_model_bin(parts)
    state, arch = to_state_dict(model)
    storage = storage_dtype(model)
    del model
    vocabulary = write_tokenizer(source, out, arch.vocab_size)
    generation = generation_config(source_config, arch, vocabulary)
    tokenizer = WhisperTokenizer.from_pretrained(out)
    if len(tokenizer) != arch.vocab_size:
        raise Ct2FormatError(f"the tokenizer has {len(tokenizer)} tokens, the model {arch.vocab_size}")
    extractor_options = {}
    if (source / "preprocessor_config.json").is_file():  # newer folders (large-v3) carry one
        saved = json.loads((source / "preprocessor_config.json").read_text(encoding="utf-8"))
        keys = ("chunk_length", "hop_length", "n_fft", "sampling_rate", "n_samples", "padding_value")
        extractor_options = {k: v for k, v in saved.items() if k in keys}
    extractor = WhisperFeatureExtractor(feature_size=arch.num_mel_bins, **extractor_options)  # type: ignore[no-untyped-call]
    processor = WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer)  # type: ignore[no-untyped-call]
    processor.save_pretrained(out)
    config = WhisperConfig(
        **asdict(arch),  # the architecture's fields are WhisperConfig's own names
        activation_function="gelu",
        scale_embedding=False,
        pad_token_id=generation["pad_token_id"],
        bos_token_id=generation["bos_token_id"],
        eos_token_id=generation["eos_token_id"],
        decoder_start_token_id=generation["decoder_start_token_id"],
        architectures=["WhisperForConditionalGeneration"],
    )
    config.dtype = storage
    config.save_pretrained(out)
    GenerationConfig(**generation).save_pretrained(out)  # type: ignore[no-untyped-call]
    torch_dtype = getattr(torch, storage)
    tensors = {name: torch.from_numpy(array).to(torch_dtype) for name, array in state.items()}
    weights_file = out / "model.safetensors"
    save_file(tensors, str(weights_file), metadata={"format": "pt"})
    del tensors

    written = load_file(str(weights_file))
    if set(written) != set(state):
        raise Ct2FormatError("the written weights do not hold the converted tensors")
    for name, array in state.items():  # exact: float16 sources narrow back losslessly
        if not np.array_equal(written[name].float().numpy(), array):
            raise Ct2FormatError(f"verification failed: {name} differs from model.bin after writing")
    del written
    reloaded: Any = WhisperForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    loaded, info = reloaded
    problems = {kind: names for kind, names in info.items() if names}
    if problems:
        raise Ct2FormatError(f"transformers does not load the converted folder cleanly: {problems}")
    parameters = dict(loaded.named_parameters())
    for name, array in state.items():
        if name in parameters and not np.array_equal(parameters[name].detach().float().numpy(), array):
            raise Ct2FormatError(f"verification failed: transformers loads {name} differently")
    return {
        "converter_version": CONVERTER_VERSION,
        "binary_version": read_header_version(parts[0]),
        "stored_as": storage,
        "multilingual": generation["is_multilingual"],
        "tensors": len(state),
        "parameters": int(sum(array.size for array in state.values())),
    }
