"""The benchmark suite: capacity, batching gain, stability, efficiency and the GPU's physical limit.

One command runs every part against the real server (a separate `uvicorn main:app` process, on a
Whisper architecture with random weights built by ../shared/tools/make_whisper_checkpoint.py with
`--eot-after 16`, so decoding stops after about 20 tokens as a trained model's would):

    python bench/suite.py                              # tiny on this machine's CPU
    python bench/suite.py --size turbo --device cuda   # a GPU machine: turbo, a 60-minute stream

Parts (`--parts` picks some):

- physical: encoder FLOPs of one 30 s window, measured matmul rate (fp32 on CPU; bf16 and fp16
  on CUDA) and the encoder-bound ceiling in windows per second and live streams;
- batching: throughput (audio seconds per wall second) of the server's backend at batch sizes
  1, 2, 4, 8, 16 and 32;
- capacity: N live speakers at real-time pace (bench/load.py); the largest N whose p95 final
  latency is within the budget (2.0 s) with bounded lag and no errors, found by doubling and then
  bisection, plus one run at twice the first failing N;
- stability: one long live stream; final latency, model seconds per audio second and server RSS
  over time, and the ratio of the last fifth to the first fifth;
- efficiency: the server's model seconds for the streams of the capacity run against one
  batched offline pass over the same audio in 30 s windows (ratio ≥ 1, lower is better).

Results go to bench/results/: suite-<size>-<device>.json (the previous run is kept beside it as
.previous.json and compared in the summary), summary-<size>-<device>.md and PNG plots.
`--update-docs` writes the summary into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.batch_vs_sequential import build_checkpoint, speech_clips  # noqa: E402
from bench.common import ServerProcess, machine  # noqa: E402
from bench.load import client_audio, percentile, run_load, summarise  # noqa: E402
from bench.streaming_quality import RATE  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PARTS = ("physical", "batching", "capacity", "stability", "efficiency")
WINDOW_S = 30.0


# -- in-process parts: the server's own backend, no server ------------------------------------


def load_backend(checkpoint: Path, device: str) -> Any:
    from real_time_audio.config import load_settings
    from real_time_audio.whisper.backend import WhisperBackend

    return WhisperBackend.load(load_settings(transcription_model_id=str(checkpoint), device=device))


def free_memory() -> None:
    """Give back what a dropped backend held (the caller deletes its last reference first)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def matmul_tflops(device: str, dtype_name: str, size: int, seconds: float) -> float:
    """Measured dense matmul rate: repeated size×size products for about `seconds`."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    with torch.inference_mode():
        a @ b  # warm-up: kernels chosen, clocks up
        synchronize(device)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for _ in range(10):
                a @ b
            runs += 10
            synchronize(device)
        elapsed = time.perf_counter() - started
    return 2 * size**3 * runs / elapsed / 1e12


def encoder_flops(config: Any) -> int:
    """FLOPs (2 per multiply-add) of the Whisper encoder on one 30 s window, from its shape.

    Two convolutions over the 3000 mel frames, then per layer: the four attention projections,
    the attention scores and their weighted sum over all 1500 positions, and the MLP.
    """
    frames, positions = 3000, config.max_source_positions
    width, mlp, mels = config.d_model, config.encoder_ffn_dim, config.num_mel_bins
    convolutions = 2 * 3 * (mels * width * frames + width * width * positions)
    layer = 2 * (4 * positions * width * width + 2 * positions * positions * width + 2 * positions * width * mlp)
    return int(convolutions + config.encoder_layers * layer)


def physical(backend: Any, partial_interval_s: float) -> dict[str, Any]:
    """Encoder FLOPs per 30 s window against the device's measured matmul rate."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = backend.model
    flops = encoder_flops(model.config)
    # Cross-check with torch's own count (it misses attention kernels it has no formula for).
    features = torch.zeros(1, model.config.num_mel_bins, 3000, device=backend.device, dtype=backend.dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.get_encoder()(features)
    if backend.device.startswith("cuda"):
        rates = {name: matmul_tflops(backend.device, name, 8192, 5.0) for name in ("bfloat16", "float16")}
    else:
        rates = {"float32": matmul_tflops("cpu", "float32", 2048, 5.0)}
    dtype = str(backend.dtype).removeprefix("torch.")
    rate = rates.get(dtype, max(rates.values()))
    windows_per_s = rate * 1e12 / flops
    return {
        "encoder_gflops_per_window": round(flops / 1e9, 2),
        "encoder_gflops_counted_by_torch": round(counter.get_total_flops() / 1e9, 2),
        "matmul_tflops": {name: round(value, 2) for name, value in rates.items()},
        "model_dtype": dtype,
        "encoder_bound_windows_per_s": round(windows_per_s, 1),
        # A live stream needs about one encoder window per partial interval while it speaks.
        "encoder_bound_streams": math.floor(windows_per_s * partial_interval_s),
    }


def batching(backend: Any, sizes: list[int], job_s: float, repeats: int) -> list[dict[str, Any]]:
    """Throughput of one batched backend call per batch size (median of `repeats`)."""
    from real_time_audio.service import TranscriptionRequest

    clips = speech_clips(max(sizes), job_s)
    rows = []
    for size in sizes:
        requests = [TranscriptionRequest(audio=clip, language="en") for clip in clips[:size]]
        backend.transcribe_batch(requests)  # warm-up of this shape
        synchronize(backend.device)
        walls = []
        for _ in range(repeats):
            started = time.perf_counter()
            backend.transcribe_batch(requests)
            synchronize(backend.device)
            walls.append(time.perf_counter() - started)
        wall = statistics.median(walls)
        rows.append(
            {
                "batch_size": size,
                "wall_s": round(wall, 4),
                "audio_s_per_wall_s": round(size * job_s / wall, 2),
                "windows_per_s": round(size / wall, 2),
            }
        )
        print(f"  batch {size:>3}: {wall:.3f} s per call, {size * job_s / wall:.1f} audio s per wall s", flush=True)
    for row in rows:
        row["gain_vs_batch_1"] = round(row["audio_s_per_wall_s"] / rows[0]["audio_s_per_wall_s"], 2)
    return rows


def offline_model_seconds(backend: Any, clients: int, seconds: float, batch_size: int) -> dict[str, Any]:
    """The capacity run's audio, every client's stream cut into 30 s windows, in batched calls."""
    from real_time_audio.service import TranscriptionRequest

    step = int(WINDOW_S * RATE)
    windows = []
    for client in range(clients):
        audio, _ = client_audio(client, seconds)
        windows += [audio[offset : offset + step] for offset in range(0, len(audio), step)]
    requests = [TranscriptionRequest(audio=w, language="en") for w in windows]
    backend.transcribe_batch(requests[:batch_size])  # warm-up
    synchronize(backend.device)
    started = time.perf_counter()
    for offset in range(0, len(requests), batch_size):
        backend.transcribe_batch(requests[offset : offset + batch_size])
    synchronize(backend.device)
    return {
        "windows": len(requests),
        "batch_size": batch_size,
        "audio_s": round(sum(len(w) for w in windows) / RATE, 1),
        "model_s": round(time.perf_counter() - started, 3),
    }


# -- parts against the running server ----------------------------------------------------------


def server_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    batches = delta("rta_batch_size_count")
    return {
        "model_s": round(delta("rta_model_seconds_total"), 3),
        "audio_received_s": round(delta("rta_audio_received_seconds_total"), 2),
        "audio_decoded_s": round(delta("rta_audio_decoded_seconds_total"), 2),
        "model_calls": int(batches),
        "mean_batch_size": round(delta("rta_batch_size_sum") / batches, 2) if batches else 0.0,
        "partials_skipped": int(delta("rta_partials_skipped_total")),
    }


def verdict(summary: dict[str, Any], budget_s: float, max_lag_s: float) -> list[str]:
    """Why a load run is out of bounds (empty when it passes).

    Utterances without a final are reported but do not count: the server never drops a final
    under load, and a random-weight model's output is sometimes rejected by the decoding guards.
    """
    reasons = []
    p95 = summary["final_latency_p95_s"]
    if p95 is None or p95 > budget_s:
        reasons.append(f"p95 final latency {p95} s > {budget_s} s")
    if (summary["lag_max_s"] or 0) > max_lag_s:
        reasons.append(f"lag reached {summary['lag_max_s']} s > {max_lag_s} s")
    if summary["send_slip_max_s"] > max_lag_s:
        reasons.append(f"server stopped reading: a send was {summary['send_slip_max_s']} s late")
    if summary["errors"]:
        reasons.append(f"{len(summary['errors'])} errors")
    if summary["completed"] < summary["clients"]:
        reasons.append(f"{summary['clients'] - summary['completed']} sessions did not complete")
    return reasons


def search_capacity(passes: Callable[[int], bool], limit: int, precision: float = 0.125) -> int:
    """Largest N in 1..limit for which `passes(N)`: doubling, then bisection to `precision` of N.

    Assumes that more clients never make it easier. Returns 0 when one client already fails.
    """
    good, bad, n = 0, limit + 1, 1
    while n <= limit:
        if not passes(n):
            bad = n
            break
        good = n
        n = min(n * 2, limit) if n < limit else limit + 1
    while bad - good > max(1, int(good * precision)):
        middle = (good + bad) // 2
        if passes(middle):
            good = middle
        else:
            bad = middle
    return good


def capacity(
    server: ServerProcess, trial_s: float, budget_s: float, max_lag_s: float, limit: int
) -> tuple[int, list[dict[str, Any]]]:
    trials: list[dict[str, Any]] = []

    def passes(clients: int) -> bool:
        server.wait_idle()
        before = server.metrics()
        processes = 1 if clients <= 32 else min(max(1, (os.cpu_count() or 2) // 2), clients // 32 + 1)
        started = time.monotonic()
        summary = summarise(run_load(server.url, clients, trial_s, processes))
        summary["wall_s"] = round(time.monotonic() - started, 1)
        server.wait_idle()
        summary["server"] = server_delta(before, server.metrics())
        summary["server_rss_mib"] = round(server.rss_mib(), 1)
        summary["out_of_bounds"] = verdict(summary, budget_s, max_lag_s)
        summary["errors"] = summary["errors"][:20]
        trials.append(summary)
        state = "ok" if not summary["out_of_bounds"] else "; ".join(summary["out_of_bounds"])
        print(
            f"  N={clients:>4}: final p50 {summary['final_latency_p50_s']} s p95 {summary['final_latency_p95_s']} s,"
            f" first text p95 {summary['first_text_p95_s']} s, lag max {summary['lag_max_s']} s,"
            f" mean batch {summary['server']['mean_batch_size']}: {state}",
            flush=True,
        )
        return not summary["out_of_bounds"]

    found = search_capacity(passes, limit)
    failed = min((t["clients"] for t in trials if t["out_of_bounds"]), default=None)
    if failed is not None and 2 * failed <= limit:
        passes(2 * failed)  # one run past the edge: how fast latency grows once the server is full
    return found, sorted(trials, key=lambda t: t["clients"])


def stability(server: ServerProcess, minutes: float, edge: float = 0.2) -> dict[str, Any]:
    """One stream of `minutes`: per-minute latency, model s per audio s and RSS; last/first fifth."""
    samples: list[tuple[float, float, float, float]] = []  # wall s, model s, audio received s, RSS MiB
    done = threading.Event()

    def sample() -> None:
        started = time.monotonic()
        while not done.is_set():
            values = server.metrics()
            samples.append(
                (
                    time.monotonic() - started,
                    values.get("rta_model_seconds_total", 0.0),
                    values.get("rta_audio_received_seconds_total", 0.0),
                    server.rss_mib(),
                )
            )
            if len(samples) % 60 == 0:
                print(f"  {samples[-1][2] / 60:5.1f} min streamed, RSS {samples[-1][3]:.0f} MiB", flush=True)
            done.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    (record,) = run_load(server.url, 1, minutes * 60)
    done.set()
    sampler.join()

    whole = int(record.audio_s // 60)
    rows = []
    for minute in range(1, whole + 1):
        # From the last sample before the minute began to the last one inside it.
        first = max((s for s in samples if s[2] <= (minute - 1) * 60), key=lambda s: s[0], default=samples[0])
        last = max((s for s in samples if s[2] <= minute * 60), key=lambda s: s[0])
        latencies = [
            latency
            for latency, at in zip(record.final_latency_s, record.final_audio_s, strict=True)
            if (minute - 1) * 60 <= at < minute * 60
        ]
        rows.append(
            {
                "minute": minute,
                "model_s_per_audio_s": round((last[1] - first[1]) / max(last[2] - first[2], 1e-9), 4),
                "final_latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
                "rss_mib": round(last[3], 1),
                "_model": (first[1], last[1]),
                "_audio": (first[2], last[2]),
                "_latencies": latencies,
            }
        )
    span = max(1, round(len(rows) * edge))

    def window(part: list[dict[str, Any]]) -> dict[str, float]:
        model = sum(r["_model"][1] - r["_model"][0] for r in part)
        audio = sum(r["_audio"][1] - r["_audio"][0] for r in part)
        latencies = [x for r in part for x in r["_latencies"]]
        return {
            "model_s_per_audio_s": model / audio,
            "final_latency_p50_s": statistics.median(latencies) if latencies else math.nan,
            "rss_mib": statistics.mean(r["rss_mib"] for r in part),
        }

    start, end = window(rows[:span]), window(rows[-span:])
    for row in rows:
        for key in ("_model", "_audio", "_latencies"):
            del row[key]
    return {
        "minutes": round(record.audio_s / 60, 2),
        "utterances": record.utterances,
        "finals": record.finals,
        "missed_utterances": record.missed,
        "errors": record.errors,
        "completed": record.completed,
        "sha256_match": record.sha256_match,
        "final_latency_p95_s": percentile(record.final_latency_s, 95),
        "by_minute": rows,
        "edge_minutes": span,
        "start": {k: round(v, 4) for k, v in start.items()},
        "end": {k: round(v, 4) for k, v in end.items()},
        "end_over_start": {k: round(end[k] / start[k], 3) for k in start},
        "samples": [[round(x, 3) for x in s] for s in samples],
    }


# -- the command -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default=None, help="architecture (default: tiny on CPU, turbo on CUDA)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--checkpoint", type=Path, help="an existing Whisper folder (skips building one)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    parser.add_argument("--budget", type=float, default=2.0, help="p95 final latency allowed, seconds")
    parser.add_argument("--max-lag", type=float, default=5.0, help="largest lag (and send delay) allowed, seconds")
    parser.add_argument("--trial-seconds", type=float, default=60.0, help="audio per client in a capacity trial")
    parser.add_argument("--max-clients", type=int, help="capacity search limit (default 64 on CPU, 1024 on CUDA)")
    parser.add_argument("--minutes", type=float, help="stability stream length (default 10 on CPU, 60 on CUDA)")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    parser.add_argument("--job-seconds", type=float, default=10.0, help="speech per job in the batching part")
    parser.add_argument("--repeats", type=int, help="timed repeats per batch size (default 2 on CPU, 5 on CUDA)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE", help="server setting")
    parser.add_argument("--tag", help="name of this run's result files (default <size>-<device>)")
    parser.add_argument("--quick", action="store_true", help="a short run to check that everything works")
    parser.add_argument("--update-docs", action="store_true", help="write the summary into docs/benchmarks.md")
    args = parser.parse_args()

    import torch

    from bench import report

    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    device = ("cuda" if args.device == "auto" else args.device) if cuda else "cpu"
    size = args.size or ("turbo" if cuda else "tiny")
    minutes = args.minutes or (60.0 if cuda else 10.0)
    limit = args.max_clients or (1024 if cuda else 64)
    repeats = args.repeats or (5 if cuda else 2)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    trial_s = args.trial_seconds
    if args.quick:
        minutes, limit, trial_s, sizes = min(minutes, 2.0), min(limit, 4), min(trial_s, 20.0), sizes[:4]
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")

    checkpoint = args.checkpoint or build_checkpoint(size, Path("/tmp") / f"whisper-{size}-random-eot16", 16)
    sessions = limit + 16  # room for every client of the largest trial
    server_env = {"BATCH_MAX_SIZE": "32" if cuda else "8", "MAX_SESSIONS": str(sessions)}
    server_env["QUEUE_MAX_SIZE"] = str(max(64, sessions))  # the server wants a queue slot per session
    server_env |= dict(item.split("=", 1) for item in args.server_env)
    from real_time_audio.config import load_settings

    partial_interval_s = load_settings(**{k.lower(): v for k, v in server_env.items()}).partial_interval_ms / 1000
    tag = args.tag or f"{size}-{device.split(':')[0]}"
    results: dict[str, Any] = {
        "suite": 1,
        "tag": tag,
        "size": size,
        "device": device,
        "checkpoint": str(checkpoint),
        "machine": machine(),
        "command": " ".join(["python", "bench/suite.py", *sys.argv[1:]]),
        "settings": {
            "budget_s": args.budget,
            "max_lag_s": args.max_lag,
            "trial_seconds": trial_s,
            "max_clients": limit,
            "stability_minutes": minutes,
            "batch_sizes": sizes,
            "job_seconds": args.job_seconds,
            "repeats": repeats,
            "server_env": server_env,
        },
    }
    suite_started = time.monotonic()

    if "physical" in parts or "batching" in parts:
        backend = load_backend(checkpoint, device)
        if "physical" in parts:
            print("physical: encoder FLOPs and matmul rate", flush=True)
            results["physical"] = physical(backend, partial_interval_s)
            print(f"  {results['physical']}", flush=True)
        if "batching" in parts:
            print(f"batching: {args.job_seconds:g} s jobs at batch sizes {sizes}", flush=True)
            results["batching"] = batching(backend, sizes, args.job_seconds, repeats)
        del backend  # the in-process model must not sit beside the server's
        free_memory()

    if "capacity" in parts or "efficiency" in parts:
        print(f"capacity: {trial_s:g} s of live speech per client, p95 final ≤ {args.budget} s", flush=True)
        with ServerProcess(checkpoint, device, server_env) as server:
            found, trials = capacity(server, trial_s, args.budget, args.max_lag, limit)
        results["capacity"] = {"streams": found, "trials": trials}
        print(f"  capacity: {found} live streams", flush=True)

    if "efficiency" in parts:
        trials = results["capacity"]["trials"]
        chosen = next((t for t in trials if t["clients"] == max(found, 1)), trials[0])
        batch = max(results.get("batching", []), key=lambda r: r["audio_s_per_wall_s"], default={"batch_size": 8})
        print(f"efficiency: the {chosen['clients']}-client run offline, batch {batch['batch_size']}", flush=True)
        backend = load_backend(checkpoint, device)
        offline = offline_model_seconds(backend, chosen["clients"], trial_s, batch["batch_size"])
        del backend  # the in-process model must not sit beside the server's
        free_memory()
        results["efficiency"] = {
            "clients": chosen["clients"],
            "server_model_s": chosen["server"]["model_s"],
            "offline": offline,
            "ratio": round(chosen["server"]["model_s"] / offline["model_s"], 2),
        }
        print(f"  {results['efficiency']}", flush=True)

    if "stability" in parts:
        print(f"stability: one {minutes:g}-minute live stream", flush=True)
        with ServerProcess(checkpoint, device, server_env) as server:
            results["stability"] = stability(server, minutes)
        print(f"  end/start: {results['stability']['end_over_start']}", flush=True)

    results["wall_s"] = round(time.monotonic() - suite_started, 1)
    report.write(results, RESULTS, update_docs=args.update_docs)


if __name__ == "__main__":
    main()
