"""Server settings, read from the environment and `.env` (environment wins)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# uvicorn's default WebSocket message limit; a larger frame is closed by uvicorn itself.
UVICORN_WS_MAX_SIZE = 16 * 1024 * 1024


class SettingsError(ValueError):
    """Raised at start-up when a setting is invalid; the message names each bad variable."""


class Settings(BaseSettings):
    """Every knob of the server. Names are the environment variables, upper-cased."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False, use_attribute_docstrings=True
    )

    host: str = "127.0.0.1"
    """Interface the server binds to when started with `python main.py`."""
    port: int = Field(8000, ge=1, le=65535)
    """TCP port the server listens on when started with `python main.py`."""
    transcription_model_id: str = "openai/whisper-large-v3-turbo"
    """Hugging Face model id, or a local folder holding a transformers or faster-whisper (CTranslate2) Whisper."""
    model_fallback: bool = True
    """When the configured hub model cannot be had (no local copy, no hub), serve the small installed fallback."""
    model_cache_dir: Path | None = None
    """Where converted faster-whisper folders are kept (default ~/.cache/real-time-audio/models)."""
    device: str = "auto"
    """Where the model runs: auto (CUDA if present, else CPU), cpu, cuda or cuda:N."""
    torch_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    """Weight precision: auto = float16 on CUDA, float32 on CPU."""
    quantization: Literal["none", "int8"] = "none"
    """On CPU, int8: linear layers run as int8 products (about 30 % faster, less accurate on base)."""
    audio_storage_dir: Path = Path("audio_chunks")
    """Folder where every session's audio, transcript and metadata are kept (created if missing)."""
    log_level: Literal["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"] = "INFO"
    """Logging threshold for the server's own log lines."""
    batch_max_size: int = Field(8, ge=1, le=256)
    """Most transcription jobs run together in one batched model call."""
    batch_wait_ms: float = Field(10, ge=0, le=1000)
    """How long a worker waits after the first job for more jobs to join its batch."""
    queue_max_size: int = Field(64, ge=1)
    """Jobs that may wait for a worker; past it partial results are skipped (finals always queue)."""
    inference_workers: Annotated[int, Field(ge=1, le=16)] | Literal["auto"] = "auto"
    """Worker threads sharing the model, each running its own batches; auto: 1 on a GPU, 2 on the CPU."""
    inference_threads: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    """On the CPU, torch threads per inference worker; auto: one per core, shared among the workers."""
    preempt_partials: bool | Literal["auto"] = "auto"
    """Finals never wait for partials (they stop a running batch of partials, and never share one); auto: on the CPU."""
    max_sessions: Annotated[int, Field(ge=1)] | Literal["auto"] = 32
    """Concurrent sessions (uploads and echo loops too); the next gets 1013. `auto`: measured at start-up."""
    max_frame_bytes: int = Field(1024 * 1024, ge=1024, le=UVICORN_WS_MAX_SIZE)
    """Largest accepted WebSocket frame in bytes; a larger one closes the session with 1009."""
    idle_timeout_s: float = Field(60, gt=0)
    """A session that sends nothing for this long is closed with code 4408."""
    echo_delay_s: float = Field(1.0, ge=0, le=10)
    """Default delay before /ws/echo sends audio back (a client may ask for another with ?delay=)."""
    partial_interval_ms: int = Field(1000, ge=50)
    """Shortest time between two partial transcriptions of one session."""
    partial_interval_max_ms: int = Field(4000, ge=50)
    """Longest a busy session's partial interval stretches (to twice their round trip; at least PARTIAL_INTERVAL_MS)."""
    segment_max_s: float = Field(30, ge=1, le=30)
    """Longest stretch of audio one decode covers; speech that runs on is committed and cut there."""
    buffer_trim_s: float = Field(15, ge=1, le=30)
    """Once a session's decode buffer is longer than this (or SEGMENT_MAX_S), it is cut at a committed word."""
    buffer_keep_s: float = Field(6, ge=0, le=15)
    """When the buffer is cut, up to this much of its committed audio (from a word boundary) stays at its start,
    its words forced as the decodes' prefix, so the model goes on hearing the sentence it is in; 0 cuts at
    the last committed word and leaves only the text as the prompt."""
    context_prompt_chars: int = Field(200, ge=0, le=1000)
    """Committed text (that has left the buffer) given to the model as context; 0 turns it off."""
    context_audio_s: float = Field(20, ge=0, le=20)
    """Audio of the previous utterance (up to this many seconds) kept before the next one after a short pause,
    so the model hears the sentence so far and continues its words; 0 turns it off."""
    commit_delay_s: float = Field(2.5, ge=0, le=30)
    """How much audio must follow a word before partials that agree on it may make it final while the speaker
    goes on. Longer: fewer mid-utterance finals, each decided with more of what follows (Whisper often
    hears a word right only once it has heard the rest of the sentence); the end of an utterance finalizes
    everything whatever this is."""
    final_hold_ms: int = Field(1200, ge=0, le=3000)
    """How long the last words of an utterance that just ended (those its final decode heard less than
    `commit_delay_s` of audio after) wait for the speaker to go on before they become final: if speech
    resumes within it they are decoded again with what follows (a pause inside a sentence then gets a
    comma, not a period). Counted from the start of the silence; 0 finalizes at once."""
    vad: Literal["silero", "off"] = "silero"
    """Voice-activity detection: silero (silence is never decoded) or off (all audio is decoded)."""
    vad_threshold: float = Field(0.35, gt=0, lt=1)
    """Speech probability at which a frame counts as speech."""
    vad_silence_ms: int = Field(500, ge=100, le=10000)
    """Silence that ends an utterance; its text is then finalized."""
    vad_pad_ms: int = Field(400, ge=0, le=1000)
    """Audio kept before a speech start, so the first word is not cut."""
    vad_tail_ms: int = Field(1000, ge=0, le=2000)
    """Audio kept after a speech end: the utterance's final decode waits for it, so a last word the detector
    scores as silence (a whispered or unvoiced ending) is heard whole."""
    vad_quiet_tail_ms: int = Field(500, ge=0, le=2000)
    """The tail instead, when the silence that ended the utterance had no trace of voice in it (no frame after
    its first 0.1 s scored 0.1 or more): nothing is left to hear, so the final decode need not wait for more.
    Never longer than VAD_TAIL_MS; set it equal to VAD_TAIL_MS to always wait for the whole tail."""
    vad_min_speech_ms: int = Field(96, ge=32, le=2000)
    """Shortest sound that starts an utterance; shorter clicks and bumps are ignored."""
    no_speech_threshold: float = Field(0.6, ge=0, le=1)
    """A decode is dropped as silence when its no-speech probability is above this ..."""
    logprob_threshold: float = Field(-1.0, le=0)
    """... and its average token log-probability is below this."""
    compression_ratio_threshold: float = Field(2.4, gt=0)
    """A decode whose text compresses better than this is a loop and is dropped."""
    encoder_window: Literal["auto", "full", "partials", "sized"] = "auto"
    """full: every decode runs the encoder on a 30 s window, as Whisper was trained. sized: on the
    audio plus ENCODER_PAD_S and a few frames of the padding after it; the rest of the window is a
    precomputed window of padding at the same level, corrected by those frames (a fraction of the
    encoder's work, and the same text on the accuracy corpus). partials: sized for partial
    decodes, full for finals. auto: sized on the CPU, full on a GPU (which encodes a batch of whole
    windows in one call; sized windows were not measured there)."""
    encoder_pad_s: float = Field(1, ge=1, le=29)
    """With sized windows, how much padding after the audio is encoded in full (past it, every 25th frame)."""
    tokens_per_second: float = Field(6, gt=0)
    """Cap on generated tokens per second of audio (plus a small allowance), against runaway text."""
    warmup: bool = True
    """Run one inference at start-up so the first user does not pay for it."""
    api_docs: bool = True
    """Serve the interactive API documentation (/docs, /redoc, /openapi.json); the production configuration
    (gunicorn.conf.py, the Docker image) turns it off."""
    log_format: Literal["text", "json"] = "text"
    """text: one readable line per event; json: one JSON object per line, for log collectors."""

    # -- access and limits ----------------------------------------------------------------------
    api_tokens: Annotated[list[SecretStr], NoDecode] = []
    """Comma-separated tokens; when set, every WebSocket and HTTP API call must present one, and a stored
    session can be read back only with the token that created it."""
    admin_tokens: Annotated[list[SecretStr], NoDecode] = []
    """Comma-separated tokens that are accepted like API_TOKENS and may also read every stored session."""
    allowed_origins: Annotated[list[str], NoDecode] = []
    """Comma-separated browser origins allowed to connect (e.g. https://app.example.com); empty = any."""
    max_connections_per_client: int = Field(0, ge=0)
    """Open WebSocket connections one client address may hold; 0 = no limit."""
    max_session_s: float = Field(0, ge=0)
    """Longest a session may stay connected, in seconds; it is then finished like END. 0 = unlimited."""
    max_pending_audio_s: float = Field(60, ge=5, le=3600)
    """Audio received but not yet finalized, per session, above which the server stops reading that socket."""
    max_sample_rate: int = Field(48000, ge=8000, le=384000)
    """Highest sample rate accepted in container audio (live and uploads); higher-rate audio is refused."""
    max_channels: int = Field(2, ge=1, le=8)
    """Most channels accepted in container audio (they are mixed down to mono)."""
    max_connections: int = Field(500, ge=0)
    """Open connections (of any kind) the process serves; HTTP requests beyond it get 503. 0 = no limit."""
    header_timeout_s: float = Field(10, gt=0, le=300)
    """A connection whose request head (or WebSocket handshake) has not fully arrived this long after it
    opened is closed."""
    upload_timeout_s: float = Field(30, gt=0, le=3600)
    """An upload whose body sends nothing for this long is refused (408)."""
    upload_min_bytes_per_s: int = Field(4096, ge=0)
    """Slowest average upload rate accepted (after the first UPLOAD_TIMEOUT_S); slower uploads are refused (408)."""
    max_upload_bytes: int = Field(200 * 1024 * 1024, ge=1024)
    """Largest file accepted by POST /v1/audio/transcriptions."""
    drain_timeout_s: float = Field(20, ge=0, le=600)
    """On SIGTERM, how long open sessions get to receive their last finals before they are closed (1001)."""

    # -- storage lifecycle ----------------------------------------------------------------------
    retention_days: float = Field(0, ge=0)
    """Delete finished sessions older than this many days; 0 = keep forever."""
    retention_max_gb: float = Field(0, ge=0)
    """Delete the oldest finished sessions while the storage folder is larger than this; 0 = no limit."""
    retention_interval_s: float = Field(3600, gt=0)
    """How often the retention sweep runs."""
    s3_bucket: str | None = None
    """When set, each finished session's audio, transcript and metadata are uploaded to this bucket."""
    s3_prefix: str = "sessions/"
    """Key prefix inside the bucket; objects are <prefix><session id>/<file>."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, Ceph, R2 ...); empty = AWS. Credentials come from the usual AWS variables."""
    s3_region: str | None = None
    """Region of the bucket (AWS_DEFAULT_REGION is used when empty)."""

    @field_validator("api_tokens", "admin_tokens", "allowed_origins", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"{origin!r} is not an origin like https://app.example.com (scheme://host[:port])")
        return [origin.lower() for origin in value]

    @field_validator("s3_bucket", "s3_endpoint_url", "s3_region", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("transcription_model_id")
    @classmethod
    def _check_model_id(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @model_validator(mode="after")
    def _check_related(self) -> Settings:
        if self.max_sessions != "auto" and self.queue_max_size < self.max_sessions:
            # Each session has at most one job queued, so this makes partials the only thing skipped.
            raise ValueError(
                f"QUEUE_MAX_SIZE ({self.queue_max_size}) must be at least MAX_SESSIONS ({self.max_sessions})"
            )
        if any(not token.get_secret_value() for token in self.api_tokens):
            raise ValueError("API_TOKENS must not contain empty tokens")
        if any(not token.get_secret_value() for token in self.admin_tokens):
            raise ValueError("ADMIN_TOKENS must not contain empty tokens")
        if self.vad_pad_ms > self.vad_silence_ms:  # the pre-roll would reach into the utterance before
            raise ValueError(f"VAD_PAD_MS ({self.vad_pad_ms}) must not exceed VAD_SILENCE_MS ({self.vad_silence_ms})")
        return self


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning validation errors into one message naming each variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            if not error["loc"]:  # a check across several fields names them itself
                problems.append(message)
                continue
            name = "_".join(str(part) for part in error["loc"]).upper()
            shown = "<hidden>" if name.startswith("API_TOKENS") else repr(error.get("input"))  # never log secrets
            problems.append(f"{name}={shown}: {message}")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None
