"""The `/ws/transcribe` wire protocol (version 1) as pydantic models, one class per message."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# The one close code of our own (RFC 6455 leaves 4000-4999 to applications): the session idled out.
CLOSE_IDLE = 4408
PROTOCOL_VERSION = 1
PCM_ENCODINGS = ("pcm_s16le", "pcm_f32le")
CONTAINER_ENCODINGS = ("webm", "ogg", "mp4", "wav", "mp3", "flac")
Encoding = Literal["pcm_s16le", "pcm_f32le", "webm", "ogg", "mp4", "wav", "mp3", "flac"]
ErrorCode = Literal[
    "bad_message",
    "bad_config",
    "bad_audio",
    "too_large",
    "unauthorized",
    "forbidden_origin",
    "server_busy",
    "idle_timeout",
    "internal",
    # Additions to protocol v1:
    "max_duration",  # MAX_SESSION_S reached: the session is finished as if the client had sent END
    "storage_full",  # the recording could not be written (disk full); transcription goes on
]


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------
# Session configuration (the `config` message, the query string, and what the server echoes)


class SessionConfig(WireModel):
    """The effective audio and decoding settings of one session."""

    encoding: Encoding = "pcm_s16le"
    sample_rate: int = Field(16000, ge=8000, le=48000)
    channels: Literal[1, 2] = 1
    chunk_samples: int = 4096
    language: str | None = None
    task: Literal["transcribe", "translate"] = "transcribe"
    prompt: str | None = Field(None, max_length=1000)
    interim_results: bool = True

    @field_validator("language", mode="before")
    @classmethod
    def _normalise_language(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            if value in ("", "auto", "null", "none"):
                return None
            if not re.fullmatch(r"[a-z]{2,3}|haw|yue", value):
                raise ValueError("must be an ISO language code such as 'en', or null to detect")
        return value

    @field_validator("prompt", mode="before")
    @classmethod
    def _empty_prompt_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    def wire(self) -> dict[str, Any]:
        """The config as the protocol shows it (the prompt is echoed only when set)."""
        data = self.model_dump()
        if data["prompt"] is None:
            del data["prompt"]
        return data


class ConfigUpdate(WireModel):
    """Fields a client may set, by `config` message or query string; all optional."""

    type: Literal["config"] = "config"
    encoding: Encoding | None = None
    sample_rate: int | None = None
    channels: int | None = None
    language: str | None = None
    task: str | None = None
    prompt: str | None = None
    interim_results: bool | None = None
    chunk_samples: int | None = None  # the server's recommendation; accepted (and ignored) if echoed back


class FlushMessage(WireModel):
    type: Literal["flush"]


class KeepaliveMessage(WireModel):
    type: Literal["keepalive"]


class EndMessage(WireModel):
    type: Literal["end"]


ClientMessage = ConfigUpdate | FlushMessage | KeepaliveMessage | EndMessage
_CLIENT_MESSAGES: dict[str, type[WireModel]] = {
    "config": ConfigUpdate,
    "flush": FlushMessage,
    "keepalive": KeepaliveMessage,
    "end": EndMessage,
}


class ProtocolError(Exception):
    """A client message the server cannot accept; `code` is the protocol's error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message


def describe_validation_error(exc: ValidationError) -> str:
    """One readable sentence per invalid field, naming the field."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "message"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        parts.append(f"{field}: {message}")
    return "; ".join(parts)


MAX_TEXT_FRAME_CHARS = 64 * 1024  # a config with a long prompt is a few KiB


def parse_client_text(text: str) -> ClientMessage:
    """Parse one text frame. `END` is accepted as the plain-text end of stream."""
    import json

    if len(text) > MAX_TEXT_FRAME_CHARS:  # not parsed at all: a control message is never this long
        raise ProtocolError(
            "bad_message", f"text frame of {len(text)} characters exceeds the limit of {MAX_TEXT_FRAME_CHARS}"
        )
    if text.strip() == "END":
        return EndMessage(type="end")
    try:
        data = json.loads(text)
    except ValueError:
        raise ProtocolError("bad_message", "text frames must be JSON objects (or the plain text END)") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_message", "text frames must be JSON objects (or the plain text END)")
    kind = data.get("type")
    model = _CLIENT_MESSAGES.get(kind) if isinstance(kind, str) else None
    if model is None:
        known = ", ".join(_CLIENT_MESSAGES)
        raise ProtocolError("bad_message", f"unknown message type {kind!r}; expected one of: {known}")
    try:
        return model.model_validate(data)  # type: ignore[return-value]
    except ValidationError as exc:
        code: ErrorCode = "bad_config" if kind == "config" else "bad_message"
        raise ProtocolError(code, f"invalid {kind} message: {describe_validation_error(exc)}") from None


def query_config(query: dict[str, str]) -> dict[str, Any]:
    """The config fields given as URL query parameters (numbers parsed), for `apply_config`."""
    update: dict[str, Any] = {
        name: query[name] for name in ConfigUpdate.model_fields if name in query and name != "type"
    }
    for name in ("sample_rate", "channels"):
        if name in update and str(update[name]).strip().lstrip("-").isdigit():
            update[name] = int(update[name])
    return update


def apply_config(current: SessionConfig, update: dict[str, Any]) -> SessionConfig:
    """Return `current` with `update` applied, or raise a `bad_config` ProtocolError naming the field."""
    unknown = sorted(set(update) - set(ConfigUpdate.model_fields))
    if unknown:
        raise ProtocolError("bad_config", f"unknown config field(s): {', '.join(unknown)}")
    merged = current.model_dump() | {k: v for k, v in update.items() if k not in ("type", "chunk_samples")}
    try:
        config = SessionConfig.model_validate(merged)
    except ValidationError as exc:
        raise ProtocolError("bad_config", f"invalid config: {describe_validation_error(exc)}") from None
    return config


# ---------------------------------------------------------------------------------------------
# Server → client


class WordTiming(WireModel):
    word: str
    start: float
    end: float


class Recording(WireModel):
    audio: str
    bytes: int
    sha256: str


class StatusConnected(WireModel):
    type: Literal["status"] = "status"
    status: Literal["connected"] = "connected"
    protocol: int = PROTOCOL_VERSION
    session_id: str
    config: dict[str, Any]
    model: str
    device: str


class StatusConfigured(WireModel):
    type: Literal["status"] = "status"
    status: Literal["configured"] = "configured"
    config: dict[str, Any]


class StatusFlushed(WireModel):
    type: Literal["status"] = "status"
    status: Literal["flushed"] = "flushed"


class SessionSummary(WireModel):
    """What a session ended with: its transcript and its recording."""

    type: Literal["status"] = "status"
    status: str
    session_id: str
    text: str
    duration: float
    segments: int
    recording: Recording


class StatusCompleted(SessionSummary):
    status: Literal["completed"] = "completed"


class ResumePoint(WireModel):
    segment_id: int  # finals from this id on cover the audio from `at`
    at: float  # seconds of session audio
    bytes: int | None  # the offset of `at` in the audio sent (raw PCM only; a container cannot resume mid-stream)


class StatusShuttingDown(SessionSummary):
    """Sent after the last finals when the server shuts down, just before it closes with 1001."""

    status: Literal["shutting_down"] = "shutting_down"
    resume: ResumePoint


class Transcription(WireModel):
    type: Literal["transcription"] = "transcription"
    segment_id: int
    is_final: bool
    text: str
    start: float
    end: float
    language: str | None
    lag: float
    words: list[WordTiming] | None = None


class SpeechStarted(WireModel):
    type: Literal["speech_started"] = "speech_started"
    at: float


class SpeechEnded(WireModel):
    type: Literal["speech_ended"] = "speech_ended"
    at: float


class ErrorMessage(WireModel):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str


ServerMessage = (
    StatusConnected
    | StatusConfigured
    | StatusFlushed
    | StatusCompleted
    | StatusShuttingDown
    | Transcription
    | SpeechStarted
    | SpeechEnded
    | ErrorMessage
)


def to_json(message: ServerMessage) -> str:
    """Serialise a server message; a transcription's `words` is left out when timing is unavailable."""
    if isinstance(message, Transcription) and message.words is None:
        return message.model_dump_json(exclude={"words"})
    return message.model_dump_json()
