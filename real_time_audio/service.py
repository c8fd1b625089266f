"""The transcription engine: one Whisper model per process, fed by a bounded priority queue and
drained by worker threads that batch jobs from many sessions into one model call.

torch and transformers are imported lazily, inside the loader, so importing this module (and
forking gunicorn workers) never touches CUDA.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray

from real_time_audio.audio.pcm import MODEL_SAMPLE_RATE
from real_time_audio.ops.metrics import BatchReport
from real_time_audio.streaming.agreement import Word
from real_time_audio.whisper.alignment import token_start_times
from real_time_audio.whisper.source import ModelLoadError, ModelLocation, locate

if TYPE_CHECKING:
    from real_time_audio.config import Settings

logger = logging.getLogger(__name__)

MAX_TARGET_TOKENS = 448  # Whisper's decoder context
TOKEN_ALLOWANCE = 8  # extra tokens on top of the per-second cap, for very short clips
MAX_PROMPT_TOKENS = 200
MAX_PREFIX_TOKENS = 160  # a longer prefix is dropped (the policy keeps it far shorter)
WORD_START = "\u0120"  # how byte-level BPE marks a token that begins with a space


class EngineError(RuntimeError):
    """Base class of the engine's own errors."""


class QueueFullError(EngineError):
    """The queue is full; only partial jobs are ever refused this way."""


class EngineUnavailableError(EngineError):
    """The engine is stopped, still starting, or dead."""


@dataclass(slots=True)
class TranscriptionRequest:
    """One piece of 16 kHz mono audio to transcribe, with the options that decide its batch."""

    audio: NDArray[np.float32]
    language: str | None = None
    task: str = "transcribe"
    prompt: str | None = None
    # Words already committed for the start of this audio: the decoder is made to begin with them
    # and only its continuation is returned, so it can neither revise nor repeat them.
    prefix: str | None = None
    is_final: bool = True
    session_id: str = ""

    @property
    def batch_key(self) -> str:
        """Only jobs with equal keys share a model call; language and prompt may differ per row."""
        return self.task

    @property
    def duration(self) -> float:
        return len(self.audio) / MODEL_SAMPLE_RATE


@dataclass(slots=True)
class TranscriptionResult:
    """What the model heard in one request; word times are seconds from the start of its audio."""

    text: str
    language: str | None
    tokens: int
    truncated: bool = False
    words: list[Word] = field(default_factory=list)
    avg_logprob: float = 0.0
    no_speech_prob: float | None = None  # None: the model has no no-speech token
    after_prefix: bool = False  # the decoder began with the request's prefix: these words follow it


class Backend(Protocol):
    """What the engine needs from a model: one batched call, and some facts for the protocol."""

    model_id: str
    device: str
    languages: frozenset[str] | None  # None: any language the model detects

    def transcribe_batch(self, requests: Sequence[TranscriptionRequest]) -> list[TranscriptionResult]: ...


# ---------------------------------------------------------------------------------------------
# The Whisper backend


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
    """A Hugging Face Whisper model and its processor, run with batched `generate`.

    Each row of a batch has its own decoder prompt (context text, language), left-padded to a
    common length, so sessions with different contexts and languages still share one model call.
    Every result carries word timings (cross-attention alignment), its average log-probability
    and the no-speech probability, which the streaming policy's guards use.
    """

    def __init__(
        self, model_id: str, device: str, dtype: Any, model: Any, processor: Any, tokens_per_second: float
    ) -> None:
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.model = model
        self.processor = processor
        self.tokens_per_second = tokens_per_second
        self.location: ModelLocation | None = None  # where `load` found the weights
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
        self._special_ids = frozenset(processor.tokenizer.all_special_ids) | set(
            processor.tokenizer.added_tokens_decoder
        )
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
        backend = cls(location.name, device, dtype, model, processor, settings.tokens_per_second)
        backend.location = location
        return backend

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

    def transcribe_batch(self, requests: Sequence[TranscriptionRequest]) -> list[TranscriptionResult]:
        """One batched feature extraction, encoder pass and `generate` for all requests (same task)."""
        import torch

        features = self.processor.feature_extractor(
            [r.audio for r in requests],
            sampling_rate=MODEL_SAMPLE_RATE,
            return_tensors="pt",
            return_attention_mask=True,
        )
        input_features = features.input_features.to(self.device, self.dtype)
        attention_mask = features.attention_mask.to(self.device)
        with torch.inference_mode():
            encoded = self.model.get_encoder()(input_features)
            # One decoder step on <|startoftranscript|> gives both the no-speech probability and,
            # for rows without a language, the detected language.
            start = torch.full((len(requests), 1), self._sot, device=self.device)
            first = self.model(encoder_outputs=encoded, decoder_input_ids=start).logits[:, -1].float()
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
            decoder_ids = torch.tensor([[self._pad] * (width - len(p)) + p for p in prompts], device=self.device)
            caps = [token_cap(r.duration, self.tokens_per_second) for r in requests]
            options: dict[str, Any] = {
                "encoder_outputs": encoded,
                "attention_mask": attention_mask,
                "decoder_input_ids": decoder_ids,
                "decoder_attention_mask": decoder_ids != self._pad,
                "max_new_tokens": max(1, min(max(caps), MAX_TARGET_TOKENS - width - 1)),
                "return_dict_in_generate": True,
                "output_scores": True,
                "output_attentions": True,  # cross-attention gives the word timings
                # One generate call per window (no second pass over "unfinished" rows), so the
                # returned sequences hold exactly one row per request, decoder prompt included.
                "force_unique_generate_call": True,
            }
            if self.multilingual:
                options["language"] = languages
                options["task"] = requests[0].task
            output = self.model.generate(**options)
            sequences = output["sequences"]
            if len(sequences) != len(requests):
                raise EngineError(f"model returned {len(sequences)} results for {len(requests)} inputs")
            steps = sequences.shape[1] - width
            chosen = sequences[:, width:].unsqueeze(-1)
            logprobs = torch.cat(
                [
                    output["scores"][step].float().log_softmax(dim=-1).gather(1, chosen[:, step])
                    for step in range(steps)
                ],
                dim=1,
            )
            # The alignment heads' attention of the query that produced each generated token.
            heads = self.model.generation_config.alignment_heads
            attention = torch.stack(
                [
                    torch.stack([step[layer][:, head, -1] for layer, head in heads], dim=1)
                    for step in output["cross_attentions"]
                ],
                dim=2,
            )
            attention_rows = attention.float().cpu().numpy()  # batch × heads × tokens × frames
            # A forced prefix was read in the first step: the queries that "produced" its tokens sit
            # just before the end of the decoder prompt. Word timing needs them too.
            first_step = output["cross_attentions"][0]
            prefix_rows = [
                torch.stack([first_step[layer][row, head, -count - 1 : -1] for layer, head in heads], dim=0)
                .float()
                .cpu()
                .numpy()
                if count
                else None
                for row, count in enumerate(prefixes)
            ]
        generated = sequences[:, width:].tolist()
        logprob_rows = logprobs.cpu().tolist()
        frames = (features.attention_mask.sum(dim=-1) // 2).tolist()  # encoder frames of each clip
        results = []
        for row, tokens in enumerate(generated):
            row_attention = attention_rows[row]
            if prefix_rows[row] is not None:
                row_attention = np.concatenate([prefix_rows[row], row_attention], axis=1)
            results.append(
                self._result(
                    tokens,
                    row_attention[..., : frames[row]],
                    logprob_rows[row],
                    caps[row],
                    languages[row],
                    no_speech[row],
                    prefixes[row],
                )
            )
        return results

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
        words = self._words(kept, times)
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

    def _words(self, kept: list[tuple[int, int]], times: list[float]) -> list[Word]:
        if not kept or not times:
            return []
        """Group byte-level BPE tokens into words (a leading space starts one) with their times."""
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
            words.append(Word(text, round(start, 3), round(max(start, end), 3)))
        return words


def is_fatal(exc: BaseException) -> bool:
    """Errors after which the device cannot be trusted (the process must be restarted)."""
    text = str(exc)
    return (
        "CUDA error" in text
        or "device-side assert" in text
        or "cuDNN error" in text
        or type(exc).__name__ == "AcceleratorError"
    )


# ---------------------------------------------------------------------------------------------
# Queue and engine


@dataclass(slots=True, eq=False)
class _Job:
    request: TranscriptionRequest
    future: concurrent.futures.Future[TranscriptionResult]
    enqueued_at: float = field(default_factory=time.monotonic)


class JobQueue:
    """Bounded, two-level queue: finals first, then partials, FIFO within each.

    Partials are refused once `maxsize` jobs wait. Finals are always accepted: each session has
    at most one job in the queue, so finals are bounded by the session limit and never dropped.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._finals: deque[_Job] = deque()
        self._partials: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._ready:
            return len(self._finals) + len(self._partials)

    def depth(self) -> tuple[int, int]:
        with self._ready:
            return len(self._finals), len(self._partials)

    def put(self, job: _Job) -> None:
        with self._ready:
            if self._closed:
                raise EngineUnavailableError("the engine is shutting down")
            self._drop_cancelled()
            if job.request.is_final:
                self._finals.append(job)
            elif len(self._finals) + len(self._partials) >= self.maxsize:
                raise QueueFullError("transcription queue is full")
            else:
                self._partials.append(job)
            self._ready.notify()

    def _drop_cancelled(self) -> None:
        for jobs in (self._finals, self._partials):
            if any(j.future.cancelled() for j in jobs):
                live = [j for j in jobs if not j.future.cancelled()]
                jobs.clear()
                jobs.extend(live)

    def _pop(self, key: str | None) -> _Job | None:
        for jobs in (self._finals, self._partials):
            for job in jobs:
                if key is None or job.request.batch_key == key:
                    jobs.remove(job)
                    return job
        return None

    def take_batch(self, max_size: int, wait_s: float) -> list[_Job] | None:
        """Block for a first job, then gather compatible jobs until one deadline or `max_size`.

        Returns None once the queue is closed and empty.
        """
        with self._ready:
            while not (self._finals or self._partials):
                if self._closed:
                    return None
                self._ready.wait()
            first = self._pop(None)
            assert first is not None
            batch = [first]
            key = first.request.batch_key
            deadline = time.monotonic() + wait_s
            while len(batch) < max_size:
                job = self._pop(key)
                if job is not None:
                    batch.append(job)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._ready.wait(remaining)
            return batch

    def close(self) -> list[_Job]:
        """Refuse new jobs, wake every worker, and hand back the jobs that were still waiting."""
        with self._ready:
            self._closed = True
            left = list(self._finals) + list(self._partials)
            self._finals.clear()
            self._partials.clear()
            self._ready.notify_all()
            return left


@dataclass
class EngineStats:
    """Counters for tests, logs and (later) metrics. Updated by worker threads."""

    batches: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    jobs_completed: int = 0
    jobs_failed: int = 0
    jobs_dropped: int = 0  # their session left before a worker reached them
    partials_skipped: int = 0
    model_seconds: float = 0.0
    audio_seconds: float = 0.0


class TranscriptionEngine:
    """Owns the backend and the worker threads; sessions submit requests and await results."""

    def __init__(
        self,
        backend_factory: Callable[[], Backend],
        *,
        batch_max_size: int = 8,
        batch_wait_ms: float = 10,
        queue_max_size: int = 64,
        workers: int = 1,
        warmup: bool = True,
    ) -> None:
        self._backend_factory = backend_factory
        self.batch_max_size = batch_max_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.workers = workers
        self.warmup = warmup
        self.queue = JobQueue(queue_max_size)
        self.stats = EngineStats()
        self.backend: Backend | None = None
        self.ready = False
        self.dead_reason: str | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.on_batch: Callable[[BatchReport], None] | None = None  # metrics; called by the workers

    @classmethod
    def from_settings(cls, settings: Settings) -> TranscriptionEngine:
        return cls(
            lambda: WhisperBackend.load(settings),
            batch_max_size=settings.batch_max_size,
            batch_wait_ms=settings.batch_wait_ms,
            queue_max_size=settings.queue_max_size,
            workers=settings.inference_workers,
            warmup=settings.warmup,
        )

    @property
    def model_id(self) -> str:
        return self.backend.model_id if self.backend else ""

    @property
    def device(self) -> str:
        return self.backend.device if self.backend else ""

    @property
    def requested_model(self) -> str:
        """TRANSCRIPTION_MODEL_ID as configured (differs from `model_id` when the fallback serves)."""
        location: ModelLocation | None = getattr(self.backend, "location", None)
        return location.requested if location else self.model_id

    @property
    def fallback_reason(self) -> str | None:
        location: ModelLocation | None = getattr(self.backend, "location", None)
        return location.fallback_reason if location else None

    @property
    def dtype(self) -> str:
        return str(getattr(self.backend, "dtype", "")).removeprefix("torch.")

    def queue_depth(self) -> tuple[int, int]:
        """Jobs waiting: (finals, partials)."""
        return self.queue.depth()

    @property
    def languages(self) -> frozenset[str] | None:
        return self.backend.languages if self.backend else None

    def start(self) -> None:
        """Load the model, warm it up, start the workers. Blocking: call from a thread."""
        self.backend = self._backend_factory()
        if self.warmup:
            started = time.perf_counter()
            noise = np.random.default_rng(0).standard_normal(MODEL_SAMPLE_RATE).astype(np.float32) * 0.01
            self.backend.transcribe_batch([TranscriptionRequest(audio=noise, session_id="warmup")])
            logger.info("warm-up inference took %.2f s", time.perf_counter() - started)
        for index in range(self.workers):
            thread = threading.Thread(target=self._worker, name=f"inference-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.ready = True

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new jobs, cancel the waiting ones, and join the workers."""
        self.ready = False
        for job in self.queue.close():
            job.future.cancel()
        for thread in self._threads:
            thread.join(timeout_s)
            if thread.is_alive():
                logger.error("worker %s did not stop within %.0f s", thread.name, timeout_s)
        self._threads.clear()

    def submit(self, request: TranscriptionRequest) -> concurrent.futures.Future[TranscriptionResult]:
        """Queue a request; raises QueueFullError (partials only) or EngineUnavailableError."""
        if not self.ready:
            raise EngineUnavailableError(self.dead_reason or "the engine is not running")
        job = _Job(request, concurrent.futures.Future())
        try:
            self.queue.put(job)
        except QueueFullError:
            with self._lock:
                self.stats.partials_skipped += 1
            raise
        return job.future

    async def transcribe(self, request: TranscriptionRequest) -> TranscriptionResult:
        """Submit and await; cancelling the await cancels the job if no worker has started it."""
        return await asyncio.wrap_future(self.submit(request))

    def _worker(self) -> None:
        try:
            while (batch := self.queue.take_batch(self.batch_max_size, self.batch_wait_s)) is not None:
                live = [job for job in batch if job.future.set_running_or_notify_cancel()]
                with self._lock:
                    self.stats.jobs_dropped += len(batch) - len(live)
                if live:
                    started, waited = time.perf_counter(), time.monotonic()
                    self._run(live)
                    if self.on_batch is not None:
                        self.on_batch(
                            BatchReport(
                                size=len(live),
                                queue_waits=[waited - job.enqueued_at for job in live],
                                seconds=time.perf_counter() - started,
                                audio_seconds=sum(job.request.duration for job in live),
                                kinds=["final" if job.request.is_final else "partial" for job in live],
                            )
                        )
        except BaseException as exc:  # the worker itself broke: nothing can be trusted
            logger.exception("worker %s crashed", threading.current_thread().name)
            self._die(f"worker {threading.current_thread().name} crashed: {exc!r}")

    def _run(self, jobs: list[_Job]) -> None:
        assert self.backend is not None
        started = time.perf_counter()
        try:
            results = self.backend.transcribe_batch([job.request for job in jobs])
        except Exception as exc:
            if len(jobs) > 1 and not is_fatal(exc):
                # One bad row must not fail its neighbours: run each job alone, so that only the
                # jobs that fail on their own get the error.
                logger.warning("batch of %d failed (%r); retrying its jobs one at a time", len(jobs), exc)
                for job in jobs:
                    if self.dead_reason is None:
                        self._run([job])
                        continue
                    with self._lock:  # an earlier retry found the device broken
                        self.stats.jobs_failed += 1
                    job.future.set_exception(EngineUnavailableError(self.dead_reason))
                return
            if len(jobs) == 1:
                logger.exception("job of session %s failed", jobs[0].request.session_id)
            else:
                logger.exception("batch of %d failed", len(jobs))
            with self._lock:
                self.stats.jobs_failed += len(jobs)
            if is_fatal(exc):  # dead before anyone hears of the failure, so no one submits to it again
                self._die(f"device failure: {exc}")
            for job in jobs:
                job.future.set_exception(exc)
            return
        elapsed = time.perf_counter() - started
        with self._lock:
            self.stats.batches += 1
            self.stats.batch_sizes[len(jobs)] += 1
            self.stats.jobs_completed += len(jobs)
            self.stats.model_seconds += elapsed
            self.stats.audio_seconds += sum(job.request.duration for job in jobs)
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)

    def _die(self, reason: str) -> None:
        """Mark the engine dead: /ready turns 503 and every waiting job fails."""
        if self.dead_reason is None:
            logger.critical("FATAL: transcription engine is dead: %s; restart the process", reason)
        self.dead_reason = reason
        self.ready = False
        for job in self.queue.close():
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(EngineUnavailableError(reason))
