"""The suite's output: JSON (keeping the previous run), a markdown summary and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import replace_docs_block

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"


def write(results: dict[str, Any], folder: Path, update_docs: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tag = results["tag"]
    current = folder / f"suite-{tag}.json"
    previous = None
    if current.exists():
        previous = json.loads(current.read_text())
        current.replace(folder / f"suite-{tag}.previous.json")
    current.write_text(json.dumps(results, indent=2) + "\n")
    plots = plot(results, folder)
    summary = markdown(results, previous, plots)
    (folder / f"summary-{tag}.md").write_text(summary)
    print(summary)
    print(f"written {current}, {folder / f'summary-{tag}.md'} and {len(plots)} plots")
    if update_docs:
        write_docs(DOCS, tag, summary)


def headline(results: dict[str, Any]) -> dict[str, str]:
    """The figures that decide whether a change made things better or worse."""
    rows: dict[str, str] = {}
    if "capacity" in results:
        budget = results["settings"]["budget_s"]
        rows[f"capacity: live streams with p95 final latency ≤ {budget:g} s"] = str(results["capacity"]["streams"])
        single = next((t for t in results["capacity"]["trials"] if t["clients"] == 1), None)
        if single:
            rows["one stream: final latency p50 / p95"] = (
                f"{single['final_latency_p50_s']} s / {single['final_latency_p95_s']} s"
            )
    if "batching" in results:
        last = results["batching"][-1]
        rows[f"batching: throughput gain at batch {last['batch_size']}"] = f"×{last['gain_vs_batch_1']}"
        best = max(results["batching"], key=lambda r: r["audio_s_per_wall_s"])
        rows["batching: best throughput"] = f"{best['audio_s_per_wall_s']} audio s per s (batch {best['batch_size']})"
    if "stability" in results:
        ratio = results["stability"]["end_over_start"]
        rows["stability end/start: final latency"] = f"{ratio['final_latency_p50_s']}"
        rows["stability end/start: model s per audio s"] = f"{ratio['model_s_per_audio_s']}"
        rows["stability end/start: server RSS"] = f"{ratio['rss_mib']}"
    if "efficiency" in results:
        rows["efficiency: server model time / offline batched"] = f"{results['efficiency']['ratio']}"
    if "physical" in results:
        rows["encoder-bound ceiling (streams at one window per partial interval)"] = str(
            results["physical"]["encoder_bound_streams"]
        )
    return rows


def markdown(results: dict[str, Any], previous: dict[str, Any] | None, plots: list[str]) -> str:
    m = results["machine"]
    hardware = f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB"
    if "gpu" in m:
        hardware += f", {m['gpu']} ({m['gpu_memory_gib']} GiB)"
    lines = [
        f"### `{results['size']}` on {results['device']}",
        "",
        f"Machine: {hardware}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}.",
        f"Command: `{results['command']}` ({results['wall_s'] / 60:.0f} minutes).",
        f"Server settings: {', '.join(f'{k}={v}' for k, v in results['settings']['server_env'].items())},"
        " everything else default.",
        "",
    ]
    old = headline(previous) if previous else {}
    lines += ["| figure | this run | previous run |", "| --- | --- | --- |"]
    lines += [f"| {name} | {value} | {old.get(name, '–')} |" for name, value in headline(results).items()]
    if previous:
        lines += ["", f"The previous run: `{previous['command']}` on {previous['machine']['cpu']}."]

    if "capacity" in results:
        lines += [
            "",
            f"**Capacity trials** ({results['settings']['trial_seconds']:g} s of speech per client at real-time"
            " pace; latencies in seconds):",
            "",
            "| clients | final p50 | final p95 | first text p50 | first text p95 | lag p95 | lag max "
            "| mean batch | model s per audio s | errors | within bounds |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for t in results["capacity"]["trials"]:
            server = t["server"]
            per_audio = server["model_s"] / server["audio_received_s"] if server["audio_received_s"] else 0
            bounds = "yes" if not t["out_of_bounds"] else "no: " + "; ".join(t["out_of_bounds"])
            lines.append(
                f"| {t['clients']} | {t['final_latency_p50_s']} | {t['final_latency_p95_s']} | {t['first_text_p50_s']}"
                f" | {t['first_text_p95_s']} | {t['lag_p95_s']} | {t['lag_max_s']} | {server['mean_batch_size']}"
                f" | {per_audio:.3f} | {len(t['errors'])} | {bounds} |"
            )
    if "batching" in results:
        lines += [
            "",
            f"**Batching** ({results['settings']['job_seconds']:g} s of speech per job, median of"
            f" {results['settings']['repeats']} calls):",
            "",
            "| batch size | wall s per call | audio s per wall s | gain over batch 1 |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['batch_size']} | {r['wall_s']} | {r['audio_s_per_wall_s']} | ×{r['gain_vs_batch_1']} |"
            for r in results["batching"]
        ]
    if "stability" in results:
        s = results["stability"]
        lines += [
            "",
            f"**Stability** (one stream of {s['minutes']} minutes, {s['utterances']} utterances, {s['finals']} finals,"
            f" {len(s['errors'])} errors, recording SHA-256 {'equal' if s['sha256_match'] else 'NOT equal'};"
            f" start = first {s['edge_minutes']} min, end = last {s['edge_minutes']} min):",
            "",
            "| | start | end | end/start |",
            "| --- | --- | --- | --- |",
        ]
        for key, label in (
            ("final_latency_p50_s", "final latency p50 (s)"),
            ("model_s_per_audio_s", "model s per audio s"),
            ("rss_mib", "server RSS (MiB)"),
        ):
            lines.append(f"| {label} | {s['start'][key]} | {s['end'][key]} | {s['end_over_start'][key]} |")
    if "efficiency" in results:
        e = results["efficiency"]
        lines += [
            "",
            f"**Efficiency**: the server spent {e['server_model_s']} model seconds on the {e['clients']}-client"
            f" capacity run ({e['offline']['audio_s']} s of audio); one offline pass over the same audio in"
            f" {e['offline']['windows']} windows of 30 s, batch {e['offline']['batch_size']}, took"
            f" {e['offline']['model_s']} s: ratio **{e['ratio']}**.",
        ]
    if "physical" in results:
        p = results["physical"]
        rates = ", ".join(f"{k} {v} TFLOP/s" for k, v in p["matmul_tflops"].items())
        lines += [
            "",
            f"**Physical limit**: the encoder costs {p['encoder_gflops_per_window']} GFLOP per 30 s window"
            f" ({p['encoder_gflops_counted_by_torch']} counted by torch's FLOP counter, which skips attention"
            " kernels it has no formula for);"
            f" measured matmul rate {rates}; so at most {p['encoder_bound_windows_per_s']} windows per second"
            f" ({p['model_dtype']}), or {p['encoder_bound_streams']} live streams at one window per partial interval.",
        ]
        if "batching" in results:
            best = max(results["batching"], key=lambda r: r["windows_per_s"])
            share = 100 * best["windows_per_s"] / p["encoder_bound_windows_per_s"]
            lines.append(
                f"The backend's best measured rate is {best['windows_per_s']} windows per second"
                f" (batch {best['batch_size']}, encoder and decoder): {share:.1f} % of that ceiling."
            )
    if plots:
        lines += ["", "Plots: " + ", ".join(f"`bench/results/{name}`" for name in plots) + "."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tag = results["tag"]
    written = []
    if "capacity" in results:
        trials = results["capacity"]["trials"]
        clients = [t["clients"] for t in trials]
        figure, axis = plt.subplots(figsize=(7, 4.5))
        axis.plot(clients, [t["final_latency_p95_s"] for t in trials], "o-", label="final latency p95")
        axis.plot(clients, [t["final_latency_p50_s"] for t in trials], "o--", label="final latency p50")
        axis.plot(clients, [t["first_text_p95_s"] for t in trials], "s:", label="first text p95")
        axis.plot(clients, [t["lag_max_s"] for t in trials], "^:", label="lag max")
        axis.axhline(results["settings"]["budget_s"], color="red", linewidth=1, label="budget")
        axis.axvline(results["capacity"]["streams"], color="grey", linewidth=1, linestyle="--", label="capacity")
        axis.set_xscale("log", base=2)
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_xticks(clients)
        axis.set_xlabel("concurrent live streams")
        axis.set_ylabel("seconds")
        axis.set_title(f"Latency against load ({results['size']}, {results['device']})")
        axis.legend()
        written.append(_save(figure, folder / f"capacity-{tag}.png"))
    if "batching" in results:
        rows = results["batching"]
        figure, axis = plt.subplots(figsize=(7, 4.5))
        axis.plot([r["batch_size"] for r in rows], [r["audio_s_per_wall_s"] for r in rows], "o-")
        axis.set_xscale("log", base=2)
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_xticks([r["batch_size"] for r in rows])
        axis.set_xlabel("batch size")
        axis.set_ylabel("audio seconds per wall second")
        axis.set_title(f"Batching gain ({results['size']}, {results['device']})")
        written.append(_save(figure, folder / f"batching-{tag}.png"))
    if "stability" in results:
        rows = results["stability"]["by_minute"]
        minutes = [r["minute"] for r in rows]
        figure, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
        axes[0].plot(minutes, [r["final_latency_p50_s"] for r in rows], "o-")
        axes[0].set_ylabel("final latency p50 (s)")
        axes[1].plot(minutes, [r["model_s_per_audio_s"] for r in rows], "o-")
        axes[1].set_ylabel("model s per audio s")
        samples = results["stability"]["samples"]
        axes[2].plot([s[2] / 60 for s in samples], [s[3] for s in samples])
        axes[2].set_ylabel("server RSS (MiB)")
        axes[2].set_xlabel("minutes of audio streamed")
        axes[0].set_title(f"One long stream ({results['size']}, {results['device']})")
        written.append(_save(figure, folder / f"stability-{tag}.png"))
    return written


def _save(figure: Any, path: Path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path.name


def write_docs(docs: Path, tag: str, summary: str) -> None:
    """Replace this tag's block in the benchmarks page (or add it at the end)."""
    replace_docs_block(docs, f"<!-- suite:{tag}:begin -->", f"<!-- suite:{tag}:end -->", summary.rstrip("\n"))
    print(f"updated {docs}")
