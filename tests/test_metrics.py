"""`/metrics` in the Prometheus format, and the log formats."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from main import create_app
from real_time_audio.config import Settings
from real_time_audio.ops.logs import JsonFormatter, RedactSecrets, TextFormatter, escape_controls, redact
from real_time_audio.ops.metrics import Metrics
from real_time_audio.service import BatchReport
from tests.conftest import finals, pcm16, receive_until, speech_like
from tests.test_routes import end_session


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_model_info_says_when_the_linear_layers_run_in_int8(make_settings: Callable[..., Settings]) -> None:
    """QUANTIZATION=int8 on the CPU shows in the model's precision label."""
    settings = make_settings(quantization="int8")
    with TestClient(create_app(settings)) as client:
        info = [labels for (name, labels) in scrape(client) if name == "rta_model_info"]
    assert [dict(labels)["dtype"] for labels in info] == ["float32+int8"]


def test_metrics_describe_sessions_engine_and_errors(make_settings: Callable[..., Settings]) -> None:
    """After two sessions the counters, histograms and gauges agree exactly with what happened."""
    settings = make_settings(partial_interval_ms=200)
    clips = [pcm16(speech_like(seed, 2.0)) for seed in (31, 32)]
    with TestClient(create_app(settings)) as client:
        before = scrape(client)
        assert before[("rta_active_sessions", ())] == 0
        assert before[("rta_engine_ready", ())] == 1
        assert (
            before[
                (
                    "rta_model_info",
                    (
                        ("device", "cpu"),
                        ("dtype", "float32"),
                        ("model", str(settings.transcription_model_id)),
                        ("requested_model", str(settings.transcription_model_id)),
                    ),
                )
            ]
            == 1
        )
        sent: list[dict[str, object]] = []
        with client.websocket_connect("/ws/transcribe") as ws:
            ws.receive_json()
            ws.send_text("not json")
            ws.send_text('{"type": "config", "sample_rate": 3}')
            receive_until(ws, lambda m: m.get("code") == "bad_config")
            ws.send_bytes(clips[0])
            during = scrape(client)
            assert during[("rta_active_sessions", ())] == 1
            sent += end_session(ws)
        with client.websocket_connect("/ws/transcribe") as ws:
            ws.receive_json()
            ws.send_bytes(clips[1])
            sent += end_session(ws)
        after = scrape(client)
        engine = client.app.state.server.engine  # type: ignore[attr-defined]
        stats = engine.stats

    texts = [m for m in sent if m["type"] == "transcription"]
    partials = [m for m in texts if not m["is_final"]]
    assert after[("rta_active_sessions", ())] == 0
    ended = {labels: value for (name, labels), value in after.items() if name == "rta_sessions_ended_total"}
    assert ended == {(("status", "completed"),): 2}, ended
    assert after[("rta_errors_total", (("code", "bad_message"),))] == 1
    assert after[("rta_errors_total", (("code", "bad_config"),))] == 1
    assert after[("rta_transcriptions_total", (("kind", "final"),))] == len(finals(sent))
    assert after[("rta_transcriptions_total", (("kind", "partial"),))] == len(partials)
    assert after[("rta_session_lag_seconds_count", ())] == len(texts)
    assert after[("rta_audio_received_seconds_total", ())] == 4.0
    assert after[("rta_batch_size_count", ())] == stats.batches
    assert after[("rta_batch_size_sum", ())] == stats.jobs_completed
    assert after[("rta_inference_seconds_count", ())] == stats.batches
    waits = after[("rta_queue_wait_seconds_count", (("kind", "final"),))]
    waits += after.get(("rta_queue_wait_seconds_count", (("kind", "partial"),)), 0)
    assert waits == stats.jobs_completed
    assert after[("rta_audio_decoded_seconds_total", ())] == pytest.approx(stats.audio_seconds, rel=1e-9)
    assert after[("rta_model_seconds_total", ())] > 0
    rtf = after[("rta_model_seconds_total", ())] / stats.audio_seconds
    assert after[("rta_real_time_factor", ())] == pytest.approx(rtf, rel=1e-9)
    assert after[("rta_partials_skipped_total", ())] == stats.partials_skipped == 0
    assert after[("rta_speech_decoded_again_total", ())] == 0
    assert after[("rta_partials_preempted_total", ())] == stats.partials_preempted == 0
    assert after[("rta_queue_depth", (("kind", "final"),))] == 0
    assert after[("rta_draining", ())] == 0


def test_a_preempted_batch_counts_its_time_but_not_its_audio() -> None:
    """A batch of partials stopped for a final: its model time was spent, its audio not decoded."""
    metrics = Metrics()
    metrics.observe_batch(BatchReport(2, [0.1, 0.2], 0.5, 6.0, ["partial", "partial"], preempted=True))
    metrics.observe_batch(BatchReport(1, [0.0], 0.25, 3.0, ["final"]))
    values = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for sample in family.samples
    }
    assert values[("rta_partials_preempted_total", ())] == 2
    assert values[("rta_model_seconds_total", ())] == 0.75
    assert values[("rta_audio_decoded_seconds_total", ())] == 3.0
    assert values[("rta_batch_size_count", ())] == 2
    assert metrics.real_time_factor() == 0.25


def test_log_lines_carry_the_session_id() -> None:
    """JSON logs: one object per line with the session id and extras; text logs show it in brackets."""
    logger = logging.getLogger("real_time_audio.handler")
    record = logger.makeRecord(
        logger.name,
        logging.INFO,
        __file__,
        1,
        "error %s: %s",
        ("bad_audio", "odd byte count"),
        None,
        extra={"session_id": "ab" * 16},
    )
    entry = json.loads(JsonFormatter().format(record))
    assert {k: v for k, v in entry.items() if k != "time"} == {
        "level": "INFO",
        "logger": "real_time_audio.handler",
        "message": "error bad_audio: odd byte count",
        "session_id": "ab" * 16,
    }
    assert (
        TextFormatter()
        .format(record)
        .endswith(f" INFO real_time_audio.handler [{'ab' * 16}]: error bad_audio: odd byte count")
    )
    plain = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "no session here", (), None)
    assert TextFormatter().format(plain).endswith(" WARNING real_time_audio.handler: no session here")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            '127.0.0.1:5 - "WebSocket /ws/transcribe?encoding=webm&token=s3cr%2Ft&x=1" [accepted]',
            '127.0.0.1:5 - "WebSocket /ws/transcribe?encoding=webm&token=[REDACTED]&x=1" [accepted]',
        ),
        ('1.2.3.4:9 - "GET /?token=abc HTTP/1.1" 200', '1.2.3.4:9 - "GET /?token=[REDACTED] HTTP/1.1" 200'),
        ("< authorization: Bearer abc.def", "< authorization: Bearer [REDACTED]"),
        ("< Authorization: Basic dXNlcjpwYXNz", "< Authorization: Basic [REDACTED]"),
        ("< sec-websocket-protocol: rta.v1, rta.token.YWJj", "< sec-websocket-protocol: rta.v1, rta.token.[REDACTED]"),
        ("{'headers': [(b'authorization', b'Bearer xyz')]}", "{'headers': [(b'authorization', b'Bearer [REDACTED]')]}"),
        ("GET /sessions/ab HTTP/1.1", "GET /sessions/ab HTTP/1.1"),
    ],
)
def test_secrets_are_redacted(line: str, expected: str) -> None:
    assert redact(line) == expected


def test_a_record_can_neither_leak_a_token_nor_forge_a_line() -> None:
    """The filter rewrites the arguments before formatting: no token, and one line per record."""
    logger = logging.getLogger("uvicorn.error")
    record = logger.makeRecord(
        logger.name, logging.INFO, __file__, 1, '%s - "WebSocket %s" [accepted]', ("1.2.3.4:5", "/ws?token=t0p"), None
    )
    forged = logger.makeRecord(
        logger.name, logging.INFO, __file__, 1, "error %s: %s", ("bad_config", "x\nERROR forged\x1b[2J"), None
    )
    scrub = RedactSecrets()
    assert scrub.filter(record) and scrub.filter(forged)
    assert record.getMessage() == '1.2.3.4:5 - "WebSocket /ws?token=[REDACTED]" [accepted]'
    assert forged.getMessage() == "error bad_config: x\\nERROR forged\\x1b[2J"
    assert escape_controls("a\u2028b\rc") == "a\\u2028b\\rc"
