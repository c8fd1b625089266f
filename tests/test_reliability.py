"""Reliability: hostile input, many sessions at once, one session's failures, and kill -9.

- The WebSocket protocol is fuzzed with hypothesis against a real server: whatever the client
  sends, the server answers only with protocol messages and codes, keeps the session open after
  errors, and persists exactly the audio the protocol says it accepts.
- 50 concurrent sessions each get exactly the text they get alone, and their own recording.
- A session whose audio makes the model fail gets `internal`; sessions batched with it do not.
- A server killed with SIGKILL loses at most the last second of audio; the next start repairs
  the records it left behind.

The figures the team reports (fuzz cases run, kill -9 losses) are written to the terminal and to
test-artifacts/reliability.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import websockets
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from main import create_app
from real_time_audio.audio.files import encode
from real_time_audio.config import Settings
from real_time_audio.messages import ServerMessage
from tests.conftest import (
    PROJECT_ROOT,
    LiveServer,
    finals,
    free_port,
    pcm16,
    seconds,
    speech_like,
    stop_process,
    stream_session,
)
from tests.test_server_process import BIN, server_env, wait_ready

pytestmark = pytest.mark.slow  # integration: real servers, sessions or models

# Written from PROTOCOL.md, not from the code: the only message types and error codes allowed.
PROTOCOL_TYPES = {"status", "transcription", "speech_started", "speech_ended", "error"}
PROTOCOL_STATUSES = {"connected", "configured", "flushed", "completed"}
PROTOCOL_ERROR_CODES = {
    "bad_message",
    "bad_config",
    "bad_audio",
    "too_large",
    "unauthorized",
    "forbidden_origin",
    "server_busy",
    "idle_timeout",
    "internal",
}
PCM_WIDTH = {"pcm_s16le": 2, "pcm_f32le": 4}  # bytes per sample of the raw PCM encodings
SERVER_MESSAGE = TypeAdapter(ServerMessage)
ARTIFACT = PROJECT_ROOT / "test-artifacts" / "reliability.json"


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[str, dict[str, Any]], None]:
    """Show a test's figures in the terminal (even with -q) and keep them in test-artifacts/."""
    terminal = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def write(name: str, figures: dict[str, Any]) -> None:
        ARTIFACT.parent.mkdir(exist_ok=True)
        try:
            data = json.loads(ARTIFACT.read_text())
        except (OSError, ValueError):
            data = {}
        data[name] = figures
        ARTIFACT.write_text(json.dumps(data, indent=2) + "\n")
        request.node.user_properties.append((name, figures))
        if terminal is not None and capture is not None:
            with capture.global_and_fixture_disabled():  # past the output capture, to the terminal
                terminal.ensure_newline()
                terminal.write_line(f"[reliability] {name}: " + json.dumps(figures))

    return write


class ErrorLogs(logging.Handler):
    """Collects the server's log records at ERROR and above (a crash inside a session logs one)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def error_logs() -> Iterator[ErrorLogs]:
    handler = ErrorLogs()
    logger = logging.getLogger("real_time_audio")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


# =============================================================================================
# a. Protocol fuzzing

FRAME_CAP = 64 * 1024  # MAX_FRAME_BYTES of the fuzzed server
KNOWN_TYPES = ("config", "flush", "keepalive", "end")
CONFIG_FIELDS = (
    "encoding",
    "sample_rate",
    "channels",
    "language",
    "task",
    "prompt",
    "interim_results",
    "chunk_samples",
)
FUZZ_ENCODINGS = ("pcm_s16le", "pcm_f32le", "webm")
EXAMPLES_PER_ENCODING = 200


def text_kind(text: str) -> str:
    """How the protocol classes a text frame: "end", a known message type, or "bad_message"."""
    if text.strip() == "END":
        return "end"
    try:
        data = json.loads(text)
    except ValueError:
        return "bad_message"
    if isinstance(data, dict) and data.get("type") in KNOWN_TYPES:
        return str(data["type"])
    return "bad_message"


@dataclass(frozen=True, slots=True, repr=False)
class Text:
    """A text frame and what the protocol makes of it.

    kind: "bad_message", "flush", "keepalive" or "config". For a config, `validity` says whether
    every field was drawn valid ("valid"), at least one invalid ("invalid"), or some drawn from
    anything at all ("wild", no prediction).
    """

    text: str
    kind: str
    validity: str = "wild"

    def __repr__(self) -> str:  # hypothesis prints failing cases; keep huge frames readable
        shown = self.text if len(self.text) <= 200 else f"{self.text[:100]}...<{len(self.text)} chars>"
        return f"Text({shown!r}, {self.kind!r}, {self.validity!r})"


@dataclass(frozen=True, slots=True, repr=False)
class Binary:
    """A binary frame: `data`, or (when `stream_slice`) the next that many bytes of a real WebM stream."""

    data: bytes = b""
    stream_slice: int = 0

    def __repr__(self) -> str:
        if self.stream_slice:
            return f"Binary(stream_slice={self.stream_slice})"
        if len(self.data) <= 32:
            return f"Binary({self.data!r})"
        return f"Binary(<{len(self.data)} bytes starting {self.data[:8].hex()}>)"


Action = Text | Binary

_wild = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=2),
)
# Each field: (valid values, invalid values); a draw may also be wild.
_CONFIG_VALUES: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "encoding": (st.sampled_from(FUZZ_ENCODINGS), st.sampled_from(["aiff", "PCM", "", "opus", 16])),
    "sample_rate": (
        st.integers(8000, 48000),
        st.one_of(st.integers(max_value=7999), st.integers(min_value=48001), st.sampled_from(["fast", None])),
    ),
    "channels": (st.sampled_from([1, 2]), st.sampled_from([0, 3, -1, 6, "two", None])),
    "language": (
        st.sampled_from(["en", "de", "ja", "NL", " fr ", "auto", "", None]),
        st.sampled_from(["xx", "english", "e", "de-DE", "123", 5]),
    ),
    "task": (st.sampled_from(["transcribe", "translate"]), st.sampled_from(["summarize", "", 1, None])),
    "prompt": (st.one_of(st.none(), st.text(max_size=40)), st.sampled_from(["p" * 1001, 7, ["a"]])),
    "interim_results": (st.booleans(), st.sampled_from(["maybe", 2, -1, None, []])),
    "chunk_samples": (st.integers(), st.sampled_from(["many", 1.5, []])),
}


@st.composite
def config_texts(draw: st.DrawFn) -> Text:
    """A config message with a random subset of fields, each valid, invalid or anything."""
    message: dict[str, Any] = {"type": "config"}
    verdicts = []
    for name in draw(st.lists(st.sampled_from(CONFIG_FIELDS), unique=True, max_size=4)):
        valid, invalid = _CONFIG_VALUES[name]
        verdict, value = draw(
            st.one_of(
                valid.map(lambda v: ("valid", v)),
                invalid.map(lambda v: ("invalid", v)),
                _wild.map(lambda v: ("wild", v)),
            )
        )
        message[name] = value
        verdicts.append(verdict)
    if draw(st.integers(0, 5)) == 0:  # an unknown field
        name = draw(st.text(min_size=1, max_size=10).filter(lambda n: n not in CONFIG_FIELDS and n != "type"))
        message[name] = draw(_wild)
        verdicts.append("invalid")
    validity = "invalid" if "invalid" in verdicts else "wild" if "wild" in verdicts else "valid"
    return Text(json.dumps(message), "config", validity)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def _bad(text: str) -> Text:
    return Text(text, "bad_message")


def _huge(size: int, shape: int) -> Text:
    """A large text frame (up to a quarter of the frame cap in characters, so under it in bytes)."""
    if shape == 0:
        return _bad("é" * size)
    if shape == 1:
        return _bad(json.dumps({"type": "ü" * size}))
    if shape == 2:
        return _bad(json.dumps(list(range(size // 6))))
    return Text(json.dumps({"type": "config", "prompt": "word " * (size // 5)}), "config", "wild")


text_frames: st.SearchStrategy[Text] = st.one_of(
    st.text(max_size=60).filter(lambda t: text_kind(t) == "bad_message").map(_bad),
    st.sampled_from(
        ["", " ", "{", "}", "[1, 2", "nul", '{"type": flush}', '{"type": "flush"', "END END", "end", '"END"', "\x00"]
    ).map(_bad),
    _json_values.map(json.dumps).filter(lambda t: text_kind(t) == "bad_message").map(_bad),
    st.fixed_dictionaries({"type": st.one_of(st.text(max_size=20), st.integers(), st.none(), st.booleans())})
    .map(json.dumps)
    .filter(lambda t: text_kind(t) == "bad_message")
    .map(_bad),
    st.just(Text('{"type": "flush"}', "flush")),
    st.just(Text('{"type": "keepalive"}', "keepalive")),
    st.sampled_from(["flush", "keepalive", "end"]).map(lambda t: _bad(json.dumps({"type": t, "now": True}))),
    config_texts(),
    st.builds(  # a valid change of format, so that sessions also switch encodings before their audio
        lambda encoding, rate, channels: Text(
            json.dumps({"type": "config", "encoding": encoding, "sample_rate": rate, "channels": channels}),
            "config",
            "valid",
        ),
        st.sampled_from(FUZZ_ENCODINGS),
        st.sampled_from([8000, 16000, 44100, 48000]),
        st.sampled_from([1, 2]),
    ),
    st.builds(_huge, st.integers(1000, FRAME_CAP // 4), st.integers(0, 3)),
)


def _junk(size: int) -> bytes:
    return np.random.default_rng(size).bytes(size)


binary_frames: st.SearchStrategy[Binary] = st.one_of(
    st.binary(max_size=3000).map(lambda b: Binary(b)),
    st.just(Binary(b"")),
    st.one_of(st.integers(0, FRAME_CAP), st.sampled_from([FRAME_CAP, FRAME_CAP - 1])).map(lambda n: Binary(_junk(n))),
    st.binary(max_size=300).map(lambda b: Binary(b"\x1a\x45\xdf\xa3" + b)),  # WebM's magic, then junk
    st.integers(1, 3000).map(lambda n: Binary(stream_slice=n)),  # the next slice of a real WebM stream
)
ENDINGS = ("END", " END\n", '{"type": "end"}', "oversize", "hang_up")
ENDING_NAMES = dict(zip(ENDINGS, ("END", "END_padded", "end_message", "oversize", "hang_up"), strict=True))
BARRIER_TYPE = "barrier-before-hang-up"
BARRIER = json.dumps({"type": BARRIER_TYPE})


@dataclass(slots=True)
class Plan:
    """One fuzzed session: query parameters, the frames to send, and how it ends."""

    query: dict[str, str]
    actions: list[Action]
    ending: str


def session_plans(encoding: str) -> st.SearchStrategy[Plan]:
    return st.builds(
        Plan,
        st.fixed_dictionaries(
            {"encoding": st.just(encoding)},
            optional={
                "interim_results": st.sampled_from(["true", "false"]),
                "sample_rate": st.sampled_from(["8000", "22050", "48000"]),
                "channels": st.sampled_from(["1", "2"]),
            },
        ),
        st.lists(st.one_of(text_frames, binary_frames), max_size=10),
        st.sampled_from(ENDINGS),
    )


@dataclass(slots=True)
class Observed:
    """What happened: the frames sent, every server message, and the close code."""

    sent: list[tuple[Action, bytes | str]] = field(default_factory=list)  # each action and the frame it became
    messages: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None


async def drive(url: str, plan: Plan, webm_stream: bytes) -> Observed:
    """Play one plan against the server; collect every message until the server closes."""
    observed = Observed()
    query = "&".join(f"{k}={v}" for k, v in plan.query.items())
    stream_at = 0
    async with websockets.connect(f"{url}?{query}", max_size=None) as ws:
        first = await asyncio.wait_for(ws.recv(), seconds(30))
        assert isinstance(first, str)
        observed.messages.append(json.loads(first))

        barrier = asyncio.Event()

        async def reader() -> None:
            with contextlib.suppress(websockets.ConnectionClosed):  # raised for close codes other than 1000
                async for raw in ws:
                    assert isinstance(raw, str), "the server sent a binary frame"
                    observed.messages.append(json.loads(raw))
                    if BARRIER_TYPE in raw:
                        barrier.set()

        reading = asyncio.create_task(reader())
        for action in plan.actions:
            frame: bytes | str
            if isinstance(action, Text):
                frame = action.text
            elif action.stream_slice:
                frame = webm_stream[stream_at : stream_at + action.stream_slice]
                stream_at += action.stream_slice
            else:
                frame = action.data
            await ws.send(frame)
            observed.sent.append((action, frame))
        if plan.ending == "oversize":
            await ws.send(bytes(FRAME_CAP + 1))
        elif plan.ending == "hang_up":
            # Answers sent after our close frame are dropped by the client, so first wait for the
            # answer to one more bad frame: the server answers frames in order.
            await ws.send(BARRIER)
            observed.sent.append((_bad(BARRIER), BARRIER))
            await asyncio.wait_for(barrier.wait(), seconds(30))
            await ws.close()
        else:
            await ws.send(plan.ending)
        await asyncio.wait_for(reading, seconds(60))
        observed.close_code = ws.close_code
    return observed


@dataclass(slots=True)
class Expected:
    """What the protocol rules predict, given the server's answers to config messages."""

    accepted: list[bytes]  # binary frames the server must persist, in order
    config: dict[str, Any]  # the effective config at the end
    bad_message: int = 0
    rejected_audio: int = 0  # PCM frames that are not a whole number of samples
    flushes: int = 0


def predict(observed: Observed) -> Expected:
    """Walk the frames in the order sent, applying the rules of PROTOCOL.md and the README:

    - A config is answered with `configured` (applied) or `bad_config` (ignored); after the first
      accepted audio frame every config is refused.
    - A binary frame in a PCM encoding that is not a whole number of samples is `bad_audio` and is
      not persisted; every other binary frame (PCM, even empty, or any container slice) is
      accepted, persisted in full and fixes the format.
    - Every other text frame is `bad_message`, or `flush` (acknowledged) or `keepalive` (silent).
    """
    answers = [
        m
        for m in observed.messages[1:]
        if (m["type"] == "status" and m.get("status") == "configured")
        or (m["type"] == "error" and m["code"] == "bad_config")
    ]
    configs = [a for a, _ in observed.sent if isinstance(a, Text) and a.kind == "config"]
    assert len(answers) == len(configs), f"{len(configs)} config messages got {len(answers)} answers"
    expected = Expected(accepted=[], config=dict(observed.messages[0]["config"]))
    started = False
    answered = iter(answers)
    for action, frame in observed.sent:
        if isinstance(action, Binary):
            assert isinstance(frame, bytes)
            width = PCM_WIDTH.get(expected.config["encoding"])
            if width is not None and len(frame) % width:
                expected.rejected_audio += 1
            else:
                expected.accepted.append(frame)
                started = True
        elif action.kind == "bad_message":
            expected.bad_message += 1
        elif action.kind == "flush":
            expected.flushes += 1
        elif action.kind == "config":
            answer = next(answered)
            if started:
                assert answer["type"] == "error", f"config after audio was applied: {action.text[:200]}"
            elif answer["type"] == "status":
                assert action.validity != "invalid", f"an invalid config was applied: {action.text[:200]}"
                expected.config = answer["config"]
            else:
                assert action.validity != "valid", f"a valid config was refused: {action.text[:200]} {answer}"
    return expected


def check_messages(messages: list[dict[str, Any]]) -> None:
    """Every message is a protocol message; every error has a protocol code, never `internal`."""
    assert messages[0]["type"] == "status" and messages[0]["status"] == "connected"
    final_ids = []
    for message in messages:
        assert message["type"] in PROTOCOL_TYPES, message
        SERVER_MESSAGE.validate_python(message)
        if message["type"] == "status":
            assert message["status"] in PROTOCOL_STATUSES, message
        elif message["type"] == "error":
            assert message["code"] in PROTOCOL_ERROR_CODES, message
            assert message["code"] != "internal", message
        elif message["type"] == "transcription" and message["is_final"]:
            final_ids.append(message["segment_id"])
    assert final_ids == sorted(set(final_ids)), f"finals out of order: {final_ids}"


def wait_for_record(folder: Path, timeout: float) -> dict[str, Any]:
    """session.json once the session has closed its record."""
    deadline = time.monotonic() + timeout
    while True:
        meta: dict[str, Any] = json.loads((folder / "session.json").read_text())
        if meta["status"] != "active" or time.monotonic() > deadline:
            return meta
        time.sleep(0.02)


def check_outcome(plan: Plan, observed: Observed, storage: Path) -> Counter[str]:
    """Check one session against the protocol; returns what it exercised, for the report."""
    check_messages(observed.messages)
    expected = predict(observed)
    audio = b"".join(expected.accepted)
    digest = hashlib.sha256(audio).hexdigest()
    errors = [m["code"] for m in observed.messages if m["type"] == "error"]
    flushed = sum(1 for m in observed.messages if m["type"] == "status" and m["status"] == "flushed")
    encoding = expected.config["encoding"]
    assert errors.count("bad_message") == expected.bad_message, errors
    if encoding in PCM_WIDTH:
        assert errors.count("bad_audio") == expected.rejected_audio, errors
    session_id = observed.messages[0]["session_id"]
    folder = storage / session_id

    if plan.ending == "oversize":
        assert observed.messages[-1]["type"] == "error" and observed.messages[-1]["code"] == "too_large"
        assert observed.close_code == 1009
        assert errors.count("too_large") == 1 and flushed <= expected.flushes
        status = "frame_too_large"
    elif plan.ending == "hang_up":
        status = "disconnected"
    else:
        assert observed.close_code == 1000, observed.messages[-3:]
        done = observed.messages[-1]
        assert done["type"] == "status" and done["status"] == "completed", observed.messages[-3:]
        assert "too_large" not in errors and flushed == expected.flushes
        assert done["recording"]["sha256"] == digest and done["recording"]["bytes"] == len(audio)
        texts = [m["text"] for m in finals(observed.messages)]
        assert done["text"] == " ".join(t for t in texts if t) and done["segments"] == len(texts)
        if encoding in PCM_WIDTH:
            rate, channels = expected.config["sample_rate"], expected.config["channels"]
            assert done["duration"] == round(len(audio) / (rate * channels * PCM_WIDTH[encoding]), 3)
        status = "completed"

    meta = wait_for_record(folder, seconds(20))
    assert (meta["status"], meta["bytes"], meta["sha256"]) == (status, len(audio), digest)
    if expected.accepted:
        on_disk = (folder / meta["audio_file"]).read_bytes()
        if encoding in PCM_WIDTH:
            assert on_disk[44:] == audio and int.from_bytes(on_disk[40:44], "little") == len(audio)
        else:
            assert meta["audio_file"] == f"audio.{encoding}" and on_disk == audio

    configured = sum(1 for m in observed.messages if m["type"] == "status" and m["status"] == "configured")
    texts = [m for m in observed.messages if m["type"] == "transcription"]
    exercised = Counter(f"error_{code}" for code in errors)
    exercised.update(
        {
            f"ending_{ENDING_NAMES[plan.ending]}": 1,
            "frames_sent": len(observed.sent),
            "audio_frames_accepted": len(expected.accepted),
            "audio_frames_rejected": expected.rejected_audio,
            "audio_bytes_accepted": len(audio),
            "sessions_with_audio": int(bool(audio)),
            "configs_applied": configured,
            "encoding_changed": int(encoding != plan.query["encoding"]),
            "flushes": expected.flushes,
            "finals": sum(1 for m in texts if m["is_final"]),
            "partials": sum(1 for m in texts if not m["is_final"]),
        }
    )
    return exercised


@pytest.fixture(scope="module")
def webm_stream() -> bytes:
    return encode(speech_like(3, 1.0), 16000, "webm")


@pytest.mark.parametrize("encoding", FUZZ_ENCODINGS)
def test_fuzzed_sessions_get_only_protocol_answers_and_keep_exactly_the_accepted_audio(
    encoding: str,
    make_settings: Callable[..., Settings],
    webm_stream: bytes,
    error_logs: ErrorLogs,
    report: Callable[[str, dict[str, Any]], None],
) -> None:
    """Random frame sequences: protocol messages only, no crash or hang, errors keep the session, and
    the recording is exactly the frames the protocol accepts."""
    settings = make_settings(max_frame_bytes=FRAME_CAP, idle_timeout_s=30, partial_interval_ms=500)
    cases: Counter[str] = Counter()

    with LiveServer(create_app(settings)) as server:

        @hypothesis_settings(
            max_examples=EXAMPLES_PER_ENCODING,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        )
        @given(plan=session_plans(encoding))
        def fuzz(plan: Plan) -> None:
            cases["cases"] += 1
            observed = asyncio.run(drive(server.url, plan, webm_stream))
            cases.update(check_outcome(plan, observed, settings.audio_storage_dir))
            assert server.thread.is_alive()

        started = time.monotonic()
        fuzz()
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + seconds(10)
        while server.app.state.server.sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not server.app.state.server.sessions, "sessions were left open"
    assert not error_logs.records, [r.getMessage() for r in error_logs.records]
    report(f"fuzz_{encoding}", {**dict(sorted(cases.items())), "seconds": round(elapsed, 1)})


# =============================================================================================
# b, c. Many sessions at once, and one failing among them

CLIP_SECONDS = 2.0
CONCURRENT_SESSIONS = 50


def clip(seed: int) -> bytes:
    return pcm16(speech_like(seed, CLIP_SECONDS))


def concurrency_settings(make_settings: Callable[..., Settings]) -> Settings:
    # One partial decode per session at most: a final then covers the whole clip, so its text
    # depends only on the audio, not on when the partials happened to run.
    return make_settings(max_sessions=60, queue_max_size=120, partial_interval_ms=60_000)


class AloneTexts:
    """Each clip's transcript when its session is the only one on the server (computed once per clip)."""

    def __init__(self) -> None:
        self.texts: dict[int, str] = {}

    def get(self, url: str, seeds: list[int]) -> dict[int, str]:
        for seed in seeds:
            if seed not in self.texts:
                result = asyncio.run(stream_session(url, clip(seed)))
                assert result["close_code"] == 1000, result["messages"][-3:]
                self.texts[seed] = result["messages"][-1]["text"]
        return {seed: self.texts[seed] for seed in seeds}

    def distinct_seeds(self, url: str, count: int, first: int = 1000) -> list[int]:
        """The first `count` seeds whose clips give non-empty texts that all differ (the random model
        hears nothing in a few clips, and the same words in a few others), so a mix-up would show."""
        chosen: list[int] = []
        seen: set[str] = set()
        for seed in range(first, first + 2 * count):
            text = self.get(url, [seed])[seed]
            if text and text not in seen:
                chosen.append(seed)
                seen.add(text)
                if len(chosen) == count:
                    return chosen
        raise AssertionError(f"only {len(chosen)} of {2 * count} clips give distinct texts")


@pytest.fixture(scope="module")
def alone_texts() -> AloneTexts:
    return AloneTexts()


def test_fifty_concurrent_sessions_each_get_exactly_their_own_text_and_recording(
    make_settings: Callable[..., Settings], alone_texts: AloneTexts, report: Callable[[str, dict[str, Any]], None]
) -> None:
    """50 sessions streaming at once each get the transcript their clip gets alone, and their own SHA-256."""
    with LiveServer(create_app(concurrency_settings(make_settings))) as server:
        started = time.monotonic()
        seeds = alone_texts.distinct_seeds(server.url, CONCURRENT_SESSIONS)
        reference = alone_texts.get(server.url, seeds)
        alone_s = time.monotonic() - started
        engine = server.app.state.server.engine
        before = sum(engine.stats.batch_sizes.values())

        async def all_at_once() -> list[dict[str, Any]]:
            return list(await asyncio.gather(*(stream_session(server.url, clip(seed)) for seed in seeds)))

        started = time.monotonic()
        results = asyncio.run(all_at_once())
        together_s = time.monotonic() - started
        sizes = engine.stats.batch_sizes
    assert len({r["messages"][0]["session_id"] for r in results}) == len(seeds)
    for seed, result in zip(seeds, results, strict=True):
        done = result["messages"][-1]
        assert result["close_code"] == 1000 and done["status"] == "completed", (seed, result["messages"][-3:])
        assert done["text"] == reference[seed], seed
        assert done["text"] == " ".join(m["text"] for m in finals(result["messages"]) if m["text"])
        assert done["recording"] == {
            "audio": f"/sessions/{done['session_id']}/audio",
            "bytes": len(clip(seed)),
            "sha256": hashlib.sha256(clip(seed)).hexdigest(),
        }
        assert not [m for m in result["messages"] if m["type"] == "error"], seed
    assert max(sizes) > 1, "the sessions were never batched together"
    report(
        "concurrent_sessions",
        {
            "sessions": len(seeds),
            "alone_seconds": round(alone_s, 1),
            "together_seconds": round(together_s, 1),
            "batches_together": sum(sizes.values()) - before,
            "largest_batch": max(sizes),
        },
    )


async def stream_registering(
    url: str, audio: bytes, register: Callable[[str], None], frame_bytes: int = 8192
) -> dict[str, Any]:
    """Like `stream_session`, but hands over the session id before the first audio frame is sent."""
    messages: list[dict[str, Any]] = []
    async with websockets.connect(url, max_size=None) as ws:
        messages.append(json.loads(await asyncio.wait_for(ws.recv(), seconds(30))))
        register(messages[0]["session_id"])

        async def reader() -> None:
            async for raw in ws:
                messages.append(json.loads(raw))

        task = asyncio.create_task(reader())
        for start in range(0, len(audio), frame_bytes):
            await ws.send(audio[start : start + frame_bytes])
        await ws.send("END")
        await asyncio.wait_for(task, seconds(120))
        return {"messages": messages, "close_code": ws.close_code}


def test_a_session_whose_audio_breaks_the_model_does_not_affect_its_batch_neighbours(
    make_settings: Callable[..., Settings], alone_texts: AloneTexts, report: Callable[[str, dict[str, Any]], None]
) -> None:
    """The model fails on one session's requests: it gets `internal` for that audio; the sessions batched
    with it get exactly their own texts and close normally."""
    doomed_clip = clip(2000)
    with LiveServer(create_app(concurrency_settings(make_settings))) as server:
        healthy = alone_texts.distinct_seeds(server.url, 7)
        reference = alone_texts.get(server.url, healthy)
        engine = server.app.state.server.engine
        doomed: set[str] = set()
        batches: list[list[str]] = []
        real = engine.backend.transcribe_batch

        def sabotaged(requests: Any) -> Any:
            batches.append([r.session_id for r in requests])
            if any(r.session_id in doomed for r in requests):
                raise RuntimeError("the model cannot read this session's audio")
            return real(requests)

        engine.backend.transcribe_batch = sabotaged
        engine.batch_wait_s = 0.5  # let the sessions' first jobs gather into shared batches

        async def scenario() -> list[dict[str, Any]]:
            return list(
                await asyncio.gather(
                    stream_registering(server.url, doomed_clip, doomed.add),
                    *(stream_session(server.url, clip(seed)) for seed in healthy),
                )
            )

        failed, *others = asyncio.run(scenario())
        assert engine.ready and engine.dead_reason is None
    (doomed_id,) = doomed
    mixed = [b for b in batches if doomed_id in b and len(b) > 1]
    assert mixed, f"the failing session never shared a batch: {batches}"

    errors = [m for m in failed["messages"] if m["type"] == "error"]
    assert errors == [
        {
            "type": "error",
            "code": "internal",
            "message": "the audio at 0.00-2.00 s could not be transcribed; it is kept in the recording",
        }
    ]
    done = failed["messages"][-1]
    assert failed["close_code"] == 1000 and done["status"] == "completed"
    assert (done["text"], done["segments"]) == ("", 0)
    assert done["recording"]["sha256"] == hashlib.sha256(doomed_clip).hexdigest()
    for seed, result in zip(healthy, others, strict=True):
        done = result["messages"][-1]
        assert result["close_code"] == 1000 and done["status"] == "completed", (seed, result["messages"][-3:])
        assert done["text"] == reference[seed], seed
        assert done["recording"]["sha256"] == hashlib.sha256(clip(seed)).hexdigest()
        assert not [m for m in result["messages"] if m["type"] == "error"], seed
    report(
        "failing_session",
        {"sessions": 1 + len(healthy), "failed_shared_batches": len(mixed), "largest": max(map(len, mixed))},
    )


# =============================================================================================
# d. kill -9

FRAME_S = 0.1
KILL_AFTER_S = 3.0
SAFE_AGE_S = 1.0  # audio sent this long before the crash must be on disk


@dataclass(slots=True)
class KilledStream:
    """One session streaming at real-time pace until the server is killed."""

    name: str
    encoding: str
    sample_rate: int
    channels: int
    query: str = ""
    config: dict[str, Any] | None = None
    session_id: str = ""
    frames: list[tuple[float, bytes]] = field(default_factory=list)  # (time sent, frame)

    def audio(self) -> bytes:
        seconds_of_audio = KILL_AFTER_S + 5
        channels = [speech_like(40 + c, seconds_of_audio, rate=self.sample_rate) for c in range(self.channels)]
        samples = np.stack(channels, axis=1)
        if self.encoding == "pcm_s16le":
            return pcm16(samples)
        return bytes(samples.astype("<f4").tobytes())

    @property
    def frame_bytes(self) -> int:
        return round(self.sample_rate * FRAME_S) * self.channels * PCM_WIDTH[self.encoding]


async def stream_until_killed(port: int, server: subprocess.Popen[bytes], streams: list[KilledStream]) -> float:
    """Stream every session at real-time pace, SIGKILL the server after KILL_AFTER_S; returns the kill time."""
    killed = asyncio.Event()

    async def one(stream: KilledStream, ready: asyncio.Event, go: asyncio.Event) -> None:
        audio = stream.audio()
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/transcribe{stream.query}", max_size=None) as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), seconds(30)))
            stream.session_id = hello["session_id"]
            if stream.config:
                await ws.send(json.dumps({"type": "config", **stream.config}))
                while json.loads(await asyncio.wait_for(ws.recv(), seconds(30))).get("status") != "configured":
                    pass
            ready.set()
            await go.wait()
            start = time.monotonic()
            with contextlib.suppress(websockets.ConnectionClosed, OSError):
                for index, offset in enumerate(range(0, len(audio), stream.frame_bytes)):
                    await asyncio.sleep(max(0.0, start + index * FRAME_S - time.monotonic()))
                    if killed.is_set():
                        break
                    frame = audio[offset : offset + stream.frame_bytes]
                    await ws.send(frame)
                    stream.frames.append((time.monotonic(), frame))
                await asyncio.wait_for(ws.recv(), seconds(30))  # the connection drops

    readies = [asyncio.Event() for _ in streams]
    go = asyncio.Event()
    tasks = [asyncio.create_task(one(s, r, go)) for s, r in zip(streams, readies, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), seconds(60))
    go.set()
    await asyncio.sleep(KILL_AFTER_S)
    server.send_signal(signal.SIGKILL)
    kill_time = time.monotonic()
    killed.set()
    server.wait()
    await asyncio.wait_for(asyncio.gather(*tasks), seconds(60))
    return kill_time


def start_uvicorn(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    command = [str(BIN / "uvicorn"), "main:app", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("ab") as out:
        return subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def test_kill_9_loses_at_most_the_last_second_and_the_next_start_repairs_the_records(
    checkpoint_dir: Path, tmp_path: Path, report: Callable[[str, dict[str, Any]], None]
) -> None:
    """SIGKILL mid-stream: after a restart every record is `interrupted`, a valid WAV of the right format,
    and holds a prefix of what was sent that includes everything sent a second before the kill."""
    storage = tmp_path / "audio"
    env = server_env(checkpoint_dir, storage, WARMUP="false", VAD="off", PARTIAL_INTERVAL_MS="60000")
    log = tmp_path / "server.log"
    streams = [
        KilledStream("s16_16k_mono", "pcm_s16le", 16000, 1),
        KilledStream("s16_48k_stereo", "pcm_s16le", 48000, 2, config={"sample_rate": 48000, "channels": 2}),
        KilledStream("f32_16k_mono", "pcm_f32le", 16000, 1, query="?encoding=pcm_f32le"),
    ]
    port = free_port()
    server = start_uvicorn(port, env, log)
    try:
        wait_ready(port, server, seconds(120))
        kill_time = asyncio.run(stream_until_killed(port, server, streams))
    finally:
        stop_process(server)
    assert server.returncode == -signal.SIGKILL

    restart_port = free_port()
    restarted = start_uvicorn(restart_port, env, log)
    try:
        started = time.monotonic()
        wait_ready(restart_port, restarted, seconds(120))
        ready_s = time.monotonic() - started
    finally:
        stop_process(restarted)
    server_log = log.read_text()

    figures: dict[str, Any] = {"restart_ready_seconds": round(ready_s, 1)}
    for stream in streams:
        folder = storage / stream.session_id
        assert f"session {stream.session_id} was interrupted by a server crash" in server_log
        meta = json.loads((folder / "session.json").read_text())
        info = sf.info(str(folder / "audio.wav"))
        subtype = "PCM_16" if stream.encoding == "pcm_s16le" else "FLOAT"
        assert (info.samplerate, info.channels, info.subtype) == (stream.sample_rate, stream.channels, subtype)
        raw = (folder / "audio.wav").read_bytes()
        persisted = raw[44:]
        block = stream.channels * PCM_WIDTH[stream.encoding]
        assert info.frames == len(persisted) // block and len(persisted) % block == 0
        sent = b"".join(frame for _, frame in stream.frames)
        assert sent.startswith(persisted), stream.name
        assert (meta["status"], meta["bytes"], meta["sha256"]) == (
            "interrupted",
            len(persisted),
            hashlib.sha256(persisted).hexdigest(),
        )
        must_have = sum(len(frame) for at, frame in stream.frames if at <= kill_time - SAFE_AGE_S)
        assert len(persisted) >= must_have, (stream.name, len(persisted), must_have)
        # how long before the kill the first lost byte was sent (0: nothing sent was lost)
        offset, oldest_lost = 0, 0.0
        for at, frame in stream.frames:
            if offset + len(frame) > len(persisted):
                oldest_lost = kill_time - at
                break
            offset += len(frame)
        rate = stream.sample_rate * block
        figures[stream.name] = {
            "bytes_sent": len(sent),
            "bytes_persisted": len(persisted),
            "seconds_sent": round(len(sent) / rate, 2),
            "seconds_lost": round((len(sent) - len(persisted)) / rate, 2),
            "oldest_lost_frame_sent_s_before_kill": round(oldest_lost, 2),
        }
    report("kill_9", figures)
