"""POST /v1/audio/transcriptions: OpenAI's transcription API, served by the live sessions' engine.

An upload is a session like any other. Its bytes are kept as received under the storage folder
(session.json says `"source": "rest"`), its audio goes through the same voice-activity detection,
streaming policy and batched engine as a live session without partials (see batch.py), it counts
toward MAX_SESSIONS while it runs, and it needs the same token and origin as the WebSocket.
Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from numpy.typing import NDArray
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from real_time_audio.api.transcripts import Cue, plain_text, render_cues
from real_time_audio.audio.containers import PIECE_SAMPLES
from real_time_audio.audio.formats import guess_encoding
from real_time_audio.audio.pcm import MODEL_SAMPLE_RATE, SAMPLE_WIDTH
from real_time_audio.config import Settings
from real_time_audio.messages import SessionConfig, describe_validation_error
from real_time_audio.ops.security import client_address, owner_of, require_access
from real_time_audio.pipeline import (
    FinalSegment,
    RecordingTranscription,
    SessionPipeline,
    record_metadata,
    transcribe_ready,
)
from real_time_audio.service import EngineUnavailableError, TranscriptionEngine
from real_time_audio.state import Refusal, ServerState, State, server_state
from real_time_audio.storage.layout import new_session_id
from real_time_audio.storage.recorder import SessionRecorder
from real_time_audio.streaming.guards import compression_ratio

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("segment", "word")
READ_BLOCK_BYTES = 256 * 1024  # the upload is persisted and decoded in blocks of this size
FORM_ALLOWANCE_BYTES = 64 * 1024  # the form's other fields and its framing, on top of MAX_UPLOAD_BYTES
HEAD_BYTES = 64  # enough of a file's start to recognise its container
RETRY_AFTER_S = 5
_FORMATS_EXPECTED = "a .wav, .webm, .ogg, .mp4 (.m4a), .mp3 or .flac file"


class ApiError(Exception):
    """A refusal, answered in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.kind = kind
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class _OpenAIErrors(APIRoute):
    """Answers this router's refusals, the shared access check's 401/403 included, in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                error = exc
            except HTTPException as exc:
                detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
                error = ApiError(
                    exc.status_code,
                    str(detail.get("message", "")),
                    code=str(detail.get("code", "error")),
                    headers=dict(exc.headers or {}),
                )
            server_state(request).metrics.error(error.code)
            logger.info("POST %s refused (%d %s): %s", request.url.path, error.status, error.code, error.message)
            return error.response()

        return answer


router = APIRouter(route_class=_OpenAIErrors)

# The form, for /docs: the route reads the body itself, to stop reading it at MAX_UPLOAD_BYTES.
_FORM_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": f"The audio: {_FORMATS_EXPECTED}.",
                        },
                        "model": {"type": "string", "description": "Accepted and ignored: the server's model is used."},
                        "language": {"type": "string", "description": "ISO code such as 'en'; omit to detect."},
                        "prompt": {"type": "string", "description": "Words or context to steer spelling."},
                        "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS), "default": "json"},
                        "temperature": {"type": "number", "description": "Accepted and ignored (greedy decoding)."},
                        "timestamp_granularities[]": {
                            "type": "array",
                            "items": {"type": "string", "enum": list(GRANULARITIES)},
                            "description": "'word' adds `words` to verbose_json.",
                        },
                    },
                }
            }
        },
    }
}


@dataclass(slots=True, frozen=True)
class _Options:
    """The validated form."""

    upload: UploadFile
    config: SessionConfig  # language and prompt; the encoding is set once the file is recognised
    response_format: str
    words: bool


@router.post(
    "/v1/audio/transcriptions",
    dependencies=[Depends(require_access)],
    openapi_extra=_FORM_SCHEMA,
    tags=["openai"],
)
async def create_transcription(request: Request, state: State) -> Response:
    """Transcribe an uploaded file (OpenAI-compatible); answers json, text, srt, vtt or verbose_json."""
    _admit(state)
    address = client_address(request)
    _refuse(state.refuse_new(address))  # connections from this address
    with state.connections.hold(address):
        async with _read_form(request, state.settings) as form:
            # The session slot is taken only now that the whole body is here: a slow upload holds
            # a connection (bounded by the upload deadlines), never a slot.
            engine = _admit(state)
            options = _options(form, engine)
            state.rest_active += 1
            try:
                return await _transcribe(request, state, engine, options)
            finally:
                state.rest_active -= 1


def _admit(state: ServerState) -> TranscriptionEngine:
    """The checks made before the body is read, and again once it has arrived: shutdown, engine, capacity."""
    _refuse(state.refuse_new() or state.refuse_engine() or state.refuse_capacity())
    return state.serving_engine()


def _refuse(refusal: Refusal | None) -> None:
    """A refusal the OpenAI way: 503 while shutting down or without an engine, else 429 with Retry-After."""
    if refusal is None:
        return
    if refusal.reason == "draining":
        raise ApiError(503, refusal.message, code="shutting_down", kind="server_error")
    if refusal.reason == "engine":
        message = f"{refusal.message}: {refusal.detail}"
        raise ApiError(503, message, code="engine_unavailable", kind="server_error")
    message = refusal.message
    if refusal.reason == "capacity":
        message = (
            f"the server is at its limit of {refusal.detail} concurrent sessions and transcriptions; "
            f"try again in {RETRY_AFTER_S} s"
        )
    retry = {"Retry-After": str(RETRY_AFTER_S)}
    raise ApiError(429, message, code="server_busy", kind="rate_limit_error", headers=retry)


# -- the form -----------------------------------------------------------------------------------


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the file is larger than the limit of {limit} bytes", code="too_large", param="file")


def _too_slow(message: str) -> ApiError:
    # `Connection: close` makes the server drop the connection rather than wait for the rest.
    return ApiError(408, message, code="upload_timeout", headers={"Connection": "close"})


@contextlib.asynccontextmanager
async def _read_form(request: Request, settings: Settings) -> AsyncIterator[FormData]:
    """Parse the multipart body, refusing it (413) as soon as it is bigger than the limit allows,
    and (408) when it stalls for UPLOAD_TIMEOUT_S or arrives slower than UPLOAD_MIN_BYTES_PER_S.

    The file is spooled to a temporary file (on disk past 1 MiB), closed on the way out.
    """
    limit = settings.max_upload_bytes
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        raise ApiError(
            400,
            f"the body must be multipart/form-data with the audio in a 'file' field, not {content_type or 'empty'!r}",
            code="invalid_content_type",
        )
    budget = limit + FORM_ALLOWANCE_BYTES
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > budget:
        raise _too_large(limit)

    async def capped(stream: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        received = 0
        while True:
            try:
                chunk = await asyncio.wait_for(anext(stream), settings.upload_timeout_s)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise _too_slow(
                    f"the upload sent nothing for {settings.upload_timeout_s:g} s (after {received} bytes)"
                ) from None
            received += len(chunk)
            if received > budget:
                raise _too_large(limit)
            elapsed = loop.time() - started
            if elapsed > settings.upload_timeout_s and received < settings.upload_min_bytes_per_s * elapsed:
                raise _too_slow(
                    f"the upload is too slow: {received} bytes in {elapsed:.0f} s, below the minimum of "
                    f"{settings.upload_min_bytes_per_s} bytes/s"
                )
            yield chunk

    async with contextlib.aclosing(request.stream()) as stream:
        parser = MultiPartParser(
            request.headers, capped(stream), max_files=1, max_fields=16, max_part_size=FORM_ALLOWANCE_BYTES
        )
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise ApiError(400, f"the multipart body could not be read: {exc.message}", code="invalid_form") from None
    try:
        yield form
    finally:
        await form.close()


def _text_field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None or isinstance(value, str):
        return value
    raise ApiError(400, f"{name} must be a text field, not a file", code="invalid_value", param=name)


def _options(form: FormData, engine: TranscriptionEngine) -> _Options:
    """Validate the form; `model` and `temperature` are accepted and ignored."""
    upload = form.get("file")
    if upload is None:
        raise ApiError(
            400, "the audio is missing: send it as a file in the 'file' field", code="missing_field", param="file"
        )
    if isinstance(upload, str):
        raise ApiError(
            400,
            "'file' must be a file upload (a part with a filename), not a text field",
            code="invalid_value",
            param="file",
        )
    response_format = (_text_field(form, "response_format") or "json").strip()
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(
            400,
            f"response_format {response_format!r} is not supported; use one of: {', '.join(RESPONSE_FORMATS)}",
            code="invalid_value",
            param="response_format",
        )
    granularities = [g for name in ("timestamp_granularities[]", "timestamp_granularities") for g in form.getlist(name)]
    for granularity in granularities:
        if granularity not in GRANULARITIES:
            raise ApiError(
                400,
                f"timestamp_granularities[] {granularity!r} is not supported; use segment and/or word",
                code="invalid_value",
                param="timestamp_granularities[]",
            )
    fields = {"language": _text_field(form, "language"), "prompt": _text_field(form, "prompt")}
    try:
        config = SessionConfig.model_validate({**fields, "interim_results": False})
    except ValidationError as exc:
        param = str(exc.errors()[0]["loc"][0])
        raise ApiError(400, describe_validation_error(exc), code="invalid_value", param=param) from None
    languages = engine.languages
    if config.language and languages is not None and config.language not in languages:
        raise ApiError(
            400,
            f"language: {config.language!r} is not supported by this model",
            code="invalid_value",
            param="language",
        )
    return _Options(upload, config, response_format, "word" in granularities)


def _encoding(filename: str | None, head: bytes) -> str:
    """The container, from the file's suffix, else (or when its first bytes say otherwise) from them."""
    name = filename or "the file"
    encoding = guess_encoding(filename, head)
    if encoding in SAMPLE_WIDTH:
        raise ApiError(
            400,
            f"{name!r} is raw PCM, which does not say its sample rate or channels: upload {_FORMATS_EXPECTED} "
            "instead (or stream raw PCM over /ws/transcribe)",
            code="unsupported_format",
            param="file",
        )
    if encoding is None:
        raise ApiError(
            400,
            f"the format of {name!r} is not recognised: expected {_FORMATS_EXPECTED}, named so or starting "
            f"with its usual header; the file starts with {head[:8].hex(' ') or 'nothing'}",
            code="bad_audio",
            param="file",
        )
    return encoding


# -- transcribing -------------------------------------------------------------------------------


class _Upload:
    """The blocking side of one upload, run on its own thread: reading the spooled file into the
    session's pipeline (which keeps its bytes in the record and decodes them)."""

    def __init__(self, upload: UploadFile, pipeline: SessionPipeline) -> None:
        self.source = upload.file
        self.pipeline = pipeline
        self.session_id = pipeline.session_id
        self.encoding = pipeline.config.encoding
        self.problem: str | None = None  # the first decoding problem
        self.storage_error: OSError | None = None
        self._more_waiting = False  # the last piece was full: the decoder may hold more
        self._read_all = False

    @property
    def fatal(self) -> bool:
        """The file is hostile (a decompression bomb, an impossible format): decoding stopped."""
        return self.pipeline.rejected is not None

    def next_piece(self) -> tuple[NDArray[np.float32], bool]:
        """Keep and decode the file's next block (or take the decoder's next piece of audio);
        returns at most one piece of samples and whether more may follow."""
        if self.pipeline.released or self.fatal:
            return np.zeros(0, dtype=np.float32), False
        if self._more_waiting:
            decoded = self.pipeline.more(detect=False)
        elif block := self.source.read(READ_BLOCK_BYTES):
            decoded = self.pipeline.receive(block, detect=False)
        else:
            self._read_all = True
            decoded = self.pipeline.drain(end=True, detect=False)
        self.problem = self.problem or decoded.problem  # the samples decoded before it are kept
        self._storage(decoded.storage)
        self._more_waiting = len(decoded.samples) >= PIECE_SAMPLES and not self.fatal
        return decoded.samples, not self.fatal and (self._more_waiting or not self._read_all)

    def _copy_rest(self) -> None:
        """Keep the part of the file not read yet (decoding stopped early) in the record, as received."""
        recorder = self.pipeline.recorder
        assert recorder is not None
        try:
            while block := self.source.read(READ_BLOCK_BYTES):
                try:
                    recorder.write_audio(block, self.encoding, MODEL_SAMPLE_RATE, 1)
                except OSError as exc:
                    self._storage(exc)
        except (OSError, ValueError) as exc:  # the spooled file is gone (closed on a cancelled request)
            logger.error("upload %s: the rest of the file could not be kept: %s", self.session_id, exc)

    def append_finals(self, finals: list[FinalSegment]) -> None:
        for final in finals:
            self._storage(self.pipeline.keep_final(final.segment))

    def _storage(self, problem: OSError | None) -> None:
        """A failed write (a full disk) is logged once; the transcription goes on without it."""
        if problem is None:
            return
        if self.storage_error is None:
            logger.error("upload %s: writing the record failed: %s", self.session_id, problem)
        self.storage_error = problem

    def stop_decoding(self) -> None:
        """Safe while the upload's thread decodes: that decode returns at once, with nothing more."""
        self.pipeline.stop_decoding()

    def release(self, status: str) -> None:
        """Close the record. Whatever stopped the transcription, the whole file is kept first."""
        try:
            self.pipeline.release(status, before=self._copy_rest)
        except OSError as exc:
            logger.error("upload %s: the record could not be closed: %s", self.session_id, exc)


def _peek(upload: UploadFile) -> tuple[int, bytes]:
    """The spooled file's size and first bytes (blocking: it may be on disk)."""
    source = upload.file
    size = source.seek(0, 2)
    source.seek(0)
    head = source.read(HEAD_BYTES)
    source.seek(0)
    return size, head


async def _transcribe(request: Request, state: ServerState, engine: TranscriptionEngine, options: _Options) -> Response:
    # The upload's blocking work (reading the spooled file, the record, decoding, voice detection)
    # runs on its own thread, never on the pool other requests and sessions share.
    threads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload")
    try:
        return await _transcribe_with(request, state, engine, options, threads)
    finally:
        threads.shutdown(wait=False)


async def _transcribe_with(
    request: Request, state: ServerState, engine: TranscriptionEngine, options: _Options, threads: ThreadPoolExecutor
) -> Response:
    settings = state.settings
    loop = asyncio.get_running_loop()

    def run(action: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        return loop.run_in_executor(threads, functools.partial(action, *args))

    size, head = await run(_peek, options.upload)
    if size > settings.max_upload_bytes:
        raise _too_large(settings.max_upload_bytes)
    if size == 0:
        raise ApiError(400, "the uploaded file is empty", code="bad_audio", param="file")
    encoding = _encoding(options.upload.filename, head)
    config = options.config.model_copy(update={"encoding": encoding})
    session_id = new_session_id()
    log = logging.LoggerAdapter(logger, {"session_id": session_id})
    # With tokens, the record names a digest of the one that sent the file.
    metadata = {
        "source": "rest",
        **record_metadata(settings, engine, config, request.client, owner_of(settings, request)),
        "upload": {
            "filename": options.upload.filename,
            "content_type": options.upload.content_type,
            "response_format": options.response_format,
        },
    }
    try:
        recorder = await run(SessionRecorder, settings.audio_storage_dir, session_id, metadata)
    except OSError as exc:
        log.error("upload %s: the record could not be created: %s", session_id, exc)
        raise ApiError(
            500, f"the upload could not be stored ({exc.strerror or exc})", code="storage_error", kind="server_error"
        ) from None
    pipeline = SessionPipeline(settings, recorder, config, state.vad_scorer, session_id=session_id)
    upload = _Upload(options.upload, pipeline)
    job = RecordingTranscription(pipeline)
    metrics = state.metrics
    log.info("upload %s: %s, %d bytes, from %s", session_id, encoding, size, metadata["client"])
    status = "error"
    decoded = 0  # samples
    try:
        more = True
        while more:
            samples, more = await run(upload.next_piece)
            decoded += len(samples)
            if upload.problem and not decoded:
                status = "bad_audio"
                raise ApiError(
                    400,
                    f"the file could not be decoded as {encoding}: {upload.problem}",
                    code="bad_audio",
                    param="file",
                    headers={"X-Session-Id": session_id},
                )
            metrics.audio_received.inc(len(samples) / MODEL_SAMPLE_RATE)
            job.add(samples)
            if not more:
                job.end()
            finals = await transcribe_ready(job, engine, threads)
            if finals:
                await run(upload.append_finals, finals)
        if upload.fatal:  # the rest of the file is still kept, when the upload is released
            status = "bad_audio"
            raise ApiError(
                400,
                f"the file was refused as {encoding}: {upload.problem}. The first {job.duration:.2f} s were "
                f"transcribed ({len(job.finals)} segments) and are kept with the whole file in session {session_id}",
                code="bad_audio",
                param="file",
                headers={"X-Session-Id": session_id},
            )
        if upload.problem:
            log.warning("upload %s: decoded %.2f s despite a problem: %s", session_id, job.duration, upload.problem)
        status = "completed"
    except EngineUnavailableError as exc:
        status = "engine_unavailable"
        raise ApiError(
            503,
            f"the transcription engine stopped: {exc}",
            code="engine_unavailable",
            kind="server_error",
            headers={"X-Session-Id": session_id},
        ) from None
    except asyncio.CancelledError:
        status = "disconnected"
        raise
    except ApiError:
        raise
    except Exception:
        log.exception("upload %s failed", session_id)
        raise ApiError(
            500,
            f"the file could not be transcribed (internal error); the whole file is kept in session {session_id}",
            code="internal",
            kind="server_error",
            headers={"X-Session-Id": session_id},
        ) from None
    finally:
        await _release(state, upload, status, job, log, threads)
    return _response(options, job, session_id)


async def _release(
    state: ServerState, upload: _Upload, status: str, job: RecordingTranscription, log: Any, threads: ThreadPoolExecutor
) -> None:
    """Close the record (even if this request is cancelled meanwhile), then tell the session-end hooks."""
    session_id = upload.session_id

    upload.stop_decoding()  # a decode still running in the upload's thread ends at once
    released = asyncio.get_running_loop().run_in_executor(threads, upload.release, status)
    released.add_done_callback(lambda _: state.session_ended(session_id))
    state.metrics.sessions_ended.labels(status).inc()
    state.metrics.decoded_again.inc(job.pipeline.decoded_again)
    log.info("upload %s ended: %s, %.2f s of audio, %d segments", session_id, status, job.duration, len(job.finals))
    await asyncio.shield(released)


def _response(options: _Options, job: RecordingTranscription, session_id: str) -> Response:
    headers = {"X-Session-Id": session_id}
    finals = job.finals
    cues = [Cue(f.segment.start, f.segment.end, f.segment.text) for f in finals]
    if options.response_format == "json":
        return JSONResponse({"text": plain_text(cues)}, headers=headers)
    if options.response_format != "verbose_json":
        return PlainTextResponse(render_cues(cues, options.response_format), headers=headers)
    language = next((f.segment.language for f in finals if f.segment.language), options.config.language)
    body: dict[str, Any] = {
        "task": options.config.task,
        "language": language,
        "duration": round(job.duration, 3),
        "text": plain_text(cues),
        "segments": [_segment(final) for final in finals],
    }
    if options.words:
        body["words"] = [
            {"word": word.text, "start": word.start, "end": word.end} for f in finals for word in f.segment.words
        ]
    return JSONResponse(body, headers=headers)


def _segment(final: FinalSegment) -> dict[str, Any]:
    """A segment of verbose_json; `seek` is where its decoded window began, in 10 ms frames as in Whisper."""
    segment = final.segment
    return {
        "id": segment.segment_id,
        "seek": final.window_start * 100 // MODEL_SAMPLE_RATE,
        "start": segment.start,
        "end": segment.end,
        "text": segment.text,
        "temperature": 0.0,
        "avg_logprob": round(final.avg_logprob, 4),
        "compression_ratio": round(compression_ratio(segment.text), 4),
        "no_speech_prob": None if final.no_speech_prob is None else round(final.no_speech_prob, 4),
    }
