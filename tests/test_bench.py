"""The benchmark suite's own logic: capacity search, latency attribution, verdicts and reports.

The benchmarks themselves never run in the test suite (timings are too noisy to assert on);
these tests pin down how their figures are computed.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.accuracy import ClipResult, score_runs, table
from bench.common import parse_metrics
from bench.corpus import Clip
from bench.load import ClientRecord, Received, analyse, audio_sent_by, sent_time, summarise
from bench.replay import Replayed, replay
from bench.report import headline, markdown, write_docs
from bench.suite import encoder_flops, search_capacity, server_delta, verdict
from real_time_audio.config import load_settings
from real_time_audio.messages import SessionConfig
from real_time_audio.pipeline import SessionPipeline
from tests.burst_speech import BurstTranscriber, EnergyScorer, speech_block
from tests.conftest import pcm16

pytestmark = pytest.mark.slow  # integration: real servers, sessions or models


def probe(limit: int) -> tuple[list[int], Any]:
    calls: list[int] = []

    def passes(n: int) -> bool:
        calls.append(n)
        return n <= limit

    return calls, passes


def test_a_mode_run_several_times_reports_the_mean_error_rate_and_each_run() -> None:
    """Two clips of four and six words, streamed twice: 1 then 3 words wrong; the WER is over
    both runs (4 of 20, 20 %), each run's is kept (10 %, 30 %), and counts are per run."""
    clips = [Clip("a", np.zeros(1), "one two three four", "test"), Clip("b", np.zeros(1), "a b c d e f", "test")]
    offline = [ClipResult("a", "one two three four"), ClipResult("b", "a b c d e f")]
    runs = [
        [ClipResult("a", "one two three for", finals=2, run=1), ClipResult("b", "a b c d e f", finals=1, run=1)],
        [ClipResult("a", "one too three", finals=3, run=2), ClipResult("b", "a b c d e x", finals=2, run=2)],
    ]
    summary = score_runs(clips, runs, offline, str.lower)
    assert (summary["wer"], summary["wer_runs"], summary["runs"]) == (20.0, [10.0, 30.0], 2)
    assert (summary["words"], summary["finals"]) == (10, 4)
    assert score_runs(clips, [offline], offline, str.lower)["wer"] == 0.0
    report = {"models": {"tiny.en": {"realtime": summary}}}
    assert "| tiny.en | realtime | 20.00 % (mean of 2: 10.00–30.00) |" in table(report)


def test_capacity_search_doubles_then_bisects_to_the_largest_passing_n() -> None:
    """Doubling finds the bracket (8 passes, 16 fails), bisection closes it exactly for small N."""
    calls, passes = probe(13)
    assert search_capacity(passes, 64) == 13
    assert calls == [1, 2, 4, 8, 16, 12, 14, 13]


def test_capacity_search_stops_at_the_limit() -> None:
    """When every N passes, the search reports the limit and never tries beyond it."""
    calls, passes = probe(10_000)
    assert search_capacity(passes, 48) == 48
    assert calls == [1, 2, 4, 8, 16, 32, 48]


def test_capacity_is_zero_when_one_client_fails() -> None:
    """One failing client ends the search at once."""
    calls, passes = probe(0)
    assert search_capacity(passes, 64) == 0
    assert calls == [1]


def test_capacity_search_for_large_n_stops_within_an_eighth() -> None:
    """Hundreds of streams are bracketed to 1/8 of N instead of trial by trial."""
    calls, passes = probe(300)
    assert search_capacity(passes, 1024) == 288
    assert calls == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 384, 320, 288]


def paced_frames(seconds: float, start_wall: float) -> tuple[list[float], list[float]]:
    """100 ms frames, each sent exactly when its audio ends."""
    ends = [round(0.1 * (i + 1), 1) for i in range(int(seconds * 10))]
    return ends, [start_wall + end for end in ends]


def text(at: float, start: float, end: float, is_final: bool, lag: float) -> Received:
    return Received(at, {"type": "transcription", "is_final": is_final, "start": start, "end": end, "lag": lag})


def test_frame_times_are_looked_up_by_audio_and_by_wall_clock() -> None:
    """The frame holding an audio second, and the audio sent by a wall time."""
    ends, walls = paced_frames(10, 100.0)
    assert sent_time(ends, walls, 2.0) == pytest.approx(102.0)
    assert sent_time(ends, walls, 2.05) == pytest.approx(102.1)
    assert audio_sent_by(ends, walls, 103.55) == pytest.approx(3.5)
    assert audio_sent_by(ends, walls, 99.0) == 0.0


def test_final_latency_counts_from_the_last_audio_of_its_utterance() -> None:
    """Latency of a final, first-text latency and missed utterances, from exact arrival times."""
    ends, walls = paced_frames(20, 100.0)
    utterances = [(1.0, 4.0), (6.0, 9.0), (11.0, 14.0)]
    received = [
        text(101.6, 1.0, 1.4, False, 0.5),  # first text of utterance 0, 0.6 s after its first frame
        text(104.9, 1.1, 3.9, True, 0.7),  # its final, 0.9 s after its last frame
        text(107.5, 6.2, 6.9, False, 0.4),  # utterance 1: a partial...
        text(108.0, 6.2, 7.1, True, 0.6),  # ...a piece committed while it still goes on (decoded to 7.4 s)...
        text(110.2, 7.2, 8.8, True, 0.8),  # ...and its last final, 1.2 s after its end
        Received(110.5, {"type": "speech_ended", "at": 9.1}),  # anything else is ignored
    ]
    record = ClientRecord(client=0, audio_s=20.0, utterances=3)
    analyse(record, utterances, ends, walls, received)
    assert [round(x, 3) for x in record.final_latency_s] == [0.9, 0.6, 1.2]
    assert record.final_audio_s == [4.0, 9.0, 9.0]
    assert [round(x, 3) for x in record.first_text_latency_s] == [0.6, 1.5]
    assert record.missed == 1  # utterance 2 ended inside the stream and got nothing
    assert record.finals == 3
    assert record.lags == [0.5, 0.7, 0.4, 0.6, 0.8]


def test_utterances_past_the_end_of_the_stream_are_not_missed() -> None:
    """Audio never sent cannot be late."""
    ends, walls = paced_frames(5, 0.0)
    record = ClientRecord(client=0, audio_s=5.0, utterances=1)
    analyse(record, [(4.0, 7.0)], ends, walls, [])
    assert record.missed == 0


def record(client: int, latencies: list[float], **fields: Any) -> ClientRecord:
    values = {"audio_s": 60.0, "utterances": 10, "completed": True, "sha256_match": True, "finals": len(latencies)}
    return ClientRecord(client=client, final_latency_s=latencies, **(values | fields))


def test_summary_pools_every_client() -> None:
    """Percentiles are over all finals of all clients; errors keep the client they came from."""
    records = [
        record(0, [0.5, 0.7], lags=[0.2, 1.0], first_text_latency_s=[1.0], send_slip_max_s=0.01),
        record(1, [0.9, 2.1], lags=[0.4], errors=["server_busy: full"], completed=False, send_slip_max_s=0.03),
    ]
    summary = summarise(records)
    assert summary["clients"] == 2
    assert summary["finals"] == 4
    assert summary["final_latency_p50_s"] == 0.8
    assert summary["final_latency_p95_s"] == 1.92
    assert summary["final_latency_max_s"] == 2.1
    assert summary["lag_max_s"] == 1.0
    assert summary["send_slip_max_s"] == 0.03
    assert summary["errors"] == ["client 1: server_busy: full"]
    assert summary["completed"] == 1


def test_verdict_names_every_bound_that_was_broken() -> None:
    """A run passes only within the latency budget, with bounded lag, no errors and all completed."""
    good = summarise([record(0, [0.5, 1.0], lags=[1.0])])
    assert verdict(good, 2.0, 5.0) == []
    bad = summarise(
        [
            record(0, [1.0, 3.0], lags=[6.5], send_slip_max_s=7.0),
            record(1, [], errors=["closed with 1011"], completed=False),
        ]
    )
    assert verdict(bad, 2.0, 5.0) == [
        "p95 final latency 2.9 s > 2.0 s",
        "lag reached 6.5 s > 5.0 s",
        "server stopped reading: a send was 7.0 s late",
        "1 errors",
        "1 sessions did not complete",
    ]


def test_encoder_flops_follow_the_architecture() -> None:
    """Whisper tiny (4 layers of 384, MLP 1536, 80 mel bins): 36.94 GFLOP per 30 s window."""
    from transformers import WhisperConfig

    tiny = WhisperConfig(d_model=384, encoder_layers=4, encoder_ffn_dim=1536, num_mel_bins=80)
    # convolutions 0.553 + 1.327 GFLOP; per layer 1.769 (projections) + 3.456 (attention) + 3.539 (MLP)
    assert encoder_flops(tiny) == 36_937_728_000
    turbo = WhisperConfig(d_model=1280, encoder_layers=32, encoder_ffn_dim=5120, num_mel_bins=128)
    assert encoder_flops(turbo) == 2_273_771_520_000


def test_metrics_text_is_read_by_name_and_labels() -> None:
    """The server's /metrics text becomes flat name{labels} keys, and deltas come from them."""
    before = parse_metrics(
        "# TYPE rta_model_seconds counter\nrta_model_seconds_total 10.0\n"
        '# TYPE rta_queue_depth gauge\nrta_queue_depth{kind="final"} 2\n'
    )
    assert before == {"rta_model_seconds_total": 10.0, "rta_queue_depth{kind=final}": 2.0}
    after = {"rta_model_seconds_total": 14.5, "rta_batch_size_sum": 12.0, "rta_batch_size_count": 5.0}
    assert server_delta(before, after) == {
        "model_s": 4.5,
        "audio_received_s": 0.0,
        "audio_decoded_s": 0.0,
        "model_calls": 5,
        "mean_batch_size": 2.4,
        "partials_skipped": 0,
    }


def results() -> dict[str, Any]:
    return {
        "tag": "tiny-cpu",
        "size": "tiny",
        "device": "cpu",
        "command": "python bench/suite.py --parts capacity",
        "wall_s": 600.0,
        "machine": {"cpu": "CPU", "cores": 2, "memory_gib": 24, "python": "3.11", "torch": "2", "transformers": "5"},
        "settings": {"budget_s": 2.0, "trial_seconds": 60, "server_env": {"BATCH_MAX_SIZE": "8"}},
        "capacity": {
            "streams": 1,
            "trials": [
                {
                    **summarise([record(0, [0.5, 1.0], lags=[1.0], first_text_latency_s=[1.2])]),
                    "server": {"model_s": 30.0, "audio_received_s": 60.0, "mean_batch_size": 1.0},
                    "out_of_bounds": [],
                }
            ],
        },
    }


def test_summary_compares_the_headline_with_the_previous_run() -> None:
    """The markdown puts this run's figures beside the last run's."""
    previous = results()
    previous["capacity"]["streams"] = 2
    text = markdown(results(), previous, ["capacity-tiny-cpu.png"])
    assert "| capacity: live streams with p95 final latency ≤ 2 s | 1 | 2 |" in text
    assert "| 1 | 0.75 | 0.975 | 1.2 | 1.2 | 1.0 | 1.0 | 1.0 | 0.500 | 0 | yes |" in text
    assert "`bench/results/capacity-tiny-cpu.png`" in text
    assert headline(results())["one stream: final latency p50 / p95"] == "0.75 s / 0.975 s"


def test_docs_block_is_replaced_in_place(tmp_path: Path) -> None:
    """Running the suite again rewrites its own block of the page and leaves the rest alone."""
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nintro\n")
    write_docs(page, "tiny-cpu", "first\n")
    write_docs(page, "turbo-cuda", "gpu\n")
    write_docs(page, "tiny-cpu", "second\n")
    assert page.read_text() == (
        "# Benchmarks\n\nintro\n\n"
        "<!-- suite:tiny-cpu:begin -->\nsecond\n<!-- suite:tiny-cpu:end -->\n\n"
        "<!-- suite:turbo-cuda:begin -->\ngpu\n<!-- suite:turbo-cuda:end -->\n"
    )


def test_pairs_of_utterances_give_the_borders_between_them() -> None:
    """A text belongs to the utterance nearest its middle: the border is the middle of the pause."""
    ends, walls = paced_frames(12, 0.0)
    record_ = ClientRecord(client=0, audio_s=12.0, utterances=2)
    # The border is at 5.0 s: word times from 5.0 to 6.0 (middle 5.5) put this final with the second.
    analyse(record_, [(1.0, 3.0), (7.0, 9.0)], ends, walls, [text(9.5, 5.0, 6.0, True, 0.5)])
    assert record_.final_audio_s == [9.0]
    assert record_.missed == 1


def test_quantization_groups_replace_exactly_their_layers(checkpoint_dir: Path) -> None:
    """bench/quantization.py's groups: each puts exactly its own linear layers in int8, through the
    server's `quantize_int8`."""
    import torch
    from transformers import WhisperForConditionalGeneration

    from bench.quantization import GROUPS
    from real_time_audio.whisper.backend import quantize_int8

    def linear_names(model: Any) -> set[str]:
        return {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    everything = linear_names(WhisperForConditionalGeneration.from_pretrained(checkpoint_dir))
    expected = {
        "all": everything,
        "decoder": {n for n in everything if n.startswith("model.decoder.")} | {"proj_out"},
        "projection": {"proj_out"},
        "encoder": {n for n in everything if n.startswith("model.encoder.")},
    }
    for group, names in expected.items():
        model = WhisperForConditionalGeneration.from_pretrained(checkpoint_dir)
        assert quantize_int8(model, GROUPS[group]) == len(names)
        assert everything - linear_names(model) == names, group


def test_capacity_table_shows_efficiency_where_it_was_measured() -> None:
    """bench/capacity.py's table: one row per run; efficiency as a ratio, or a dash for runs saved before it existed."""
    from bench.capacity import table

    run = {
        "clients": 1,
        "final_latency_p50_s": 1.114,
        "final_latency_p95_s": 1.436,
        "behind": 0,
        "missed_utterances": 0,
        "cpu_s_per_audio_s": 0.787,
        "wer": 3.39,
    }
    older = {**run, "clients": 2}
    rows = table({"runs": [{**run, "efficiency": 12.345}, older]}).splitlines()[2:]
    assert rows == [
        "| 1 | 1.11 / 1.44 s | 0 | 0 | 0.79 | 12.3× | 3.39 % |",
        "| 2 | 1.11 / 1.44 s | 0 | 0 | 0.79 | – | 3.39 % |",
    ]


def test_a_replay_drives_the_pipeline_on_a_clock_of_its_own(tmp_path: Path) -> None:
    """bench/replay.py runs a session as the handler does, on a virtual clock: every word spoken
    comes out final once, in order; partials are one interval apart; no final comes before the
    audio it covers has arrived; and a second run is the same in every detail."""
    audio, spoken = speech_block(seed=3, seconds=30.0)
    settings = load_settings(transcription_model_id="unused", audio_storage_dir=tmp_path, vad="silero")

    def run() -> Replayed:
        model = BurstTranscriber()
        pipeline = SessionPipeline(settings, None, SessionConfig(), EnergyScorer())
        return replay(pipeline, lambda request: model.transcribe_batch([request])[0], pcm16(audio), 0.25)

    first, second = run(), run()
    assert first.text.split() == [word.text for word in spoken]
    assert [s.text for s in first.finals] == [s.text for s in second.finals]
    assert first.final_at == second.final_at
    assert (first.decodes, first.partials, first.revised) == (second.decodes, second.partials, second.revised)
    assert all(segment.end <= at for segment, at in zip(first.finals, first.final_at, strict=True))
    assert first.final_at == sorted(first.final_at)
    partials = [at for at, kind in first.decodes if kind == "partial"]
    assert len(partials) >= 10
    assert min(b - a for a, b in itertools.pairwise(partials)) >= settings.partial_interval_ms / 1000
    assert sum(kind == "final" for _, kind in first.decodes) >= 3
