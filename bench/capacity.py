"""Capacity on real weights: N live speakers at real-time pace against one server process.

The server (a separate `uvicorn main:app` process) serves real Whisper weights from their
faster-whisper folder (bench/real_models.py; tiny.en by default). Each client streams clips of the
accuracy corpus (bench/corpus.py: real read and spontaneous English with reference transcripts) in
a rotation that starts at a different clip per client, separated by 1-3 s pauses, as 100 ms PCM
frames sent when their audio would exist, then `END`. For each number of clients it reports:

- final latency p50 / p95 (as bench/load.py measures it: a final against the moment the last audio
  frame of its utterance was sent, or the audio it was decoded from when it came mid-utterance);
- behind: clients whose largest `lag` exceeded BEHIND_LAG_S (the server had fallen that far
  behind their audio), and utterances that got no final;
- CPU-s per audio-s: CPU time of the server process during the run (user + system, all threads)
  over the seconds of audio streamed by all clients together;
- WER: each client's joined finals against the references of the clips it spoke, through
  Whisper's English normalizer, over all clients;
- efficiency: the server's model seconds during the run (its `rta_model_seconds_total`) over one
  offline pass of the same model (with the same settings, in this process once the server has
  stopped) over exactly the same audio, every client's stream cut into 30 s windows and decoded
  in batches of 8. 1 would mean that streaming costs nothing over transcribing the recordings.

    python bench/capacity.py                          # tiny.en, 1 2 4 8 clients, 60 s each
    python bench/capacity.py --clients 1 4 --seconds 90 --tag before
    python bench/capacity.py --env PARTIAL_INTERVAL_MAX_MS=1000 --tag fixed-cadence
    python bench/capacity.py --update-docs            # rewrite the capacity block of docs/benchmarks.md
    python bench/capacity.py --plot now drafts        # no run: plot saved runs (docs/images/)
    python bench/capacity.py --plot a b --image capacity-latest.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.accuracy import edit_alignment, english_normalizer  # noqa: E402
from bench.common import ServerProcess, machine, replace_docs_block  # noqa: E402
from bench.corpus import RATE, Clip, load_corpus  # noqa: E402
from bench.load import ClientRecord, Received, stream_client, summarise  # noqa: E402
from bench.real_models import faster_whisper_folder  # noqa: E402
from real_time_audio.config import Settings  # noqa: E402

SETTINGS_FIELDS = frozenset(Settings.model_fields)

BEHIND_LAG_S = 5.0
WINDOW_S = 30.0  # the offline pass cuts each client's audio into windows of this length
OFFLINE_BATCH = 8  # and decodes them in batches of this size (BATCH_MAX_SIZE's default)
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- capacity:begin -->", "<!-- capacity:end -->"


def client_speech(clips: list[Clip], client: int, seconds: float) -> tuple[np.ndarray, list[tuple[float, float]], str]:
    """Clips in rotation from clip `client`, 1-3 s pauses between them, until `seconds` of audio;
    returns the audio, each clip's (start, end) and the joined reference text."""
    rng = np.random.default_rng(2000 + client)
    pieces: list[np.ndarray] = []
    spans: list[tuple[float, float]] = []
    texts: list[str] = []
    position, index = 0, client
    while position < seconds * RATE:
        pause = np.zeros(int(rng.uniform(1.0, 3.0) * RATE), dtype=np.float32)
        clip = clips[index % len(clips)]
        index += 1
        pieces += [pause, clip.audio]
        spans.append(((position + len(pause)) / RATE, (position + len(pause) + len(clip.audio)) / RATE))
        texts.append(clip.text)
        position += len(pause) + len(clip.audio)
    pieces.append(np.zeros(2 * RATE, dtype=np.float32))
    return np.concatenate(pieces), spans, " ".join(texts)


async def speak(url: str, client: int, audio: np.ndarray, spans: list[tuple[float, float]]) -> tuple[ClientRecord, str]:
    """One live speaker (bench/load.py's client); returns its record and its joined finals."""
    received: list[Received] = []
    record = await stream_client(url, client, 0.0, time.monotonic(), speech=(audio, spans), received=received)
    finals = sorted(
        (r.message["segment_id"], r.message["text"])
        for r in received
        if r.message.get("type") == "transcription" and r.message["is_final"]
    )
    return record, " ".join(text for _, text in finals)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(server: ServerProcess, clips: list[Clip], clients: int, seconds: float, normalizer: Any) -> dict[str, Any]:
    speech = [client_speech(clips, client, seconds) for client in range(clients)]
    model_before = server.metrics().get("rta_model_seconds_total", 0.0)
    before = cpu_seconds(server.pid)

    async def everyone() -> list[tuple[ClientRecord, str]]:
        return await asyncio.gather(*(speak(server.url, c, audio, spans) for c, (audio, spans, _) in enumerate(speech)))

    results = asyncio.run(everyone())
    server.wait_idle()
    cpu = cpu_seconds(server.pid) - before
    model_s = server.metrics().get("rta_model_seconds_total", 0.0) - model_before
    records = [record for record, _ in results]
    errors = words = 0
    for (_, _, reference), (_, heard) in zip(speech, results, strict=True):
        ref, hyp = normalizer(reference).split(), normalizer(heard).split()
        errors += edit_alignment(ref, hyp)[0]
        words += len(ref)
    summary = summarise(records)
    audio_s = sum(r.audio_s for r in records)
    summary.update(
        per_client=[
            {"client": r.client, "final_latency_s": r.final_latency_s, "utterance_end_s": r.final_audio_s}
            for r in records
        ],
        behind=sum(1 for r in records if r.lags and max(r.lags) > BEHIND_LAG_S),
        cpu_s_per_audio_s=round(cpu / audio_s, 3),
        model_s=round(model_s, 3),
        wer=round(100 * errors / max(1, words), 2),
        reference_words=words,
    )
    return summary


def offline_seconds(
    model: str, env: dict[str, str], clips: list[Clip], runs: list[dict[str, Any]], seconds: float
) -> None:
    """Time one offline pass over each run's audio (30 s windows, batches of OFFLINE_BATCH) with the
    server's backend and settings, as one of its inference workers runs it (the same torch threads:
    `INFERENCE_THREADS`), and set each run's `offline_model_s` and `efficiency`."""
    from real_time_audio.config import load_settings
    from real_time_audio.service import TranscriptionRequest
    from real_time_audio.whisper.backend import WhisperBackend

    fields = {name.lower(): value for name, value in env.items() if name.lower() in SETTINGS_FIELDS}
    settings = load_settings(**{**fields, "transcription_model_id": str(faster_whisper_folder(model)), "warmup": False})
    import torch

    backend = WhisperBackend.load(settings)
    cores = torch.get_num_threads()
    step = int(WINDOW_S * RATE)

    def timed(requests: list[TranscriptionRequest]) -> float:
        backend.transcribe_batch(requests[:OFFLINE_BATCH])  # warm-up
        started = time.perf_counter()
        for offset in range(0, len(requests), OFFLINE_BATCH):
            backend.transcribe_batch(requests[offset : offset + OFFLINE_BATCH])
        return round(time.perf_counter() - started, 3)

    for summary in runs:
        windows = []
        for client in range(summary["clients"]):
            audio = client_speech(clips, client, seconds)[0]
            windows += [audio[offset : offset + step] for offset in range(0, len(audio), step)]
        requests = [TranscriptionRequest(audio=w, language="en") for w in windows]
        # Also on all cores, as earlier versions of this script timed it (for comparison only).
        torch.set_num_threads(cores)
        summary["offline_model_s_all_cores"] = timed(requests)
        backend.prepare_worker()  # the threads of one worker: model seconds on both sides are a worker's
        summary["offline_model_s"] = timed(requests)
        summary["efficiency"] = round(summary["model_s"] / summary["offline_model_s"], 2)


def table(report: dict[str, Any]) -> str:
    lines = [
        "| clients | final p50 / p95 | behind | missed | CPU-s per audio-s | efficiency | WER |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in report["runs"]:
        latency = (
            f"{s['final_latency_p50_s']:.2f} / {s['final_latency_p95_s']:.2f} s" if s["final_latency_p50_s"] else "–"
        )
        efficiency = f"{s['efficiency']:.1f}×" if s.get("efficiency") else "–"
        lines.append(
            f"| {s['clients']} | {latency} | {s['behind']} | {s['missed_utterances']} | "
            f"{s['cpu_s_per_audio_s']:.2f} | {efficiency} | {s['wer']:.2f} % |"
        )
    return "\n".join(lines)


def update_docs(report: dict[str, Any]) -> None:
    settings = ", ".join(f"{k}={v}" for k, v in report["settings"].items()) or "defaults"
    body = (
        f"{report['model']} on {report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"{report['seconds']:.0f} s per client; server settings: {settings}; {report['date']}; "
        f"command `{report['command']}`.\n\n{table(report)}"
    )
    replace_docs_block(DOCS, BEGIN, END, body)


def plot(model: str, tags: list[str], path: Path) -> None:
    """Final latency (p50 and p95) and CPU-s per audio-s against clients, one line per tagged run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, cpu) = plt.subplots(1, 2, figsize=(11, 4.2))
    for tag in tags:
        report = json.loads((RESULTS / f"capacity-{model}-{tag}.json").read_text(encoding="utf-8"))
        runs = [r for r in report["runs"] if r["final_latency_p50_s"] is not None]
        clients = [r["clients"] for r in runs]
        settings = ", ".join(f"{k}={v}" for k, v in report["settings"].items())
        label = f"{tag} ({settings})" if settings else tag
        line = latency.plot(clients, [r["final_latency_p95_s"] for r in runs], marker="o", label=f"{label}: p95")[0]
        latency.plot(
            clients, [r["final_latency_p50_s"] for r in runs], marker=".", linestyle="--", color=line.get_color()
        )
        cpu.plot(clients, [r["cpu_s_per_audio_s"] for r in runs], marker="o", label=label, color=line.get_color())
    for axes in (latency, cpu):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("live speakers")
        axes.grid(alpha=0.3)
    latency.set_yscale("log")
    latency.axhline(1.5, color="grey", linewidth=0.8)
    latency.set_ylabel("final latency, s (solid p95, dashed p50; line: 1.5 s)")
    cpu.axhline(0.3, color="grey", linewidth=0.8)
    cpu.set_ylabel("server CPU-s per audio-s (line: 0.3)")
    latency.legend(fontsize=7)
    figure.suptitle(f"{model}, live speakers at real-time pace")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny.en", choices=["tiny.en", "base"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=float, default=60.0, help="audio each client streams")
    parser.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE", help="server settings for this run")
    parser.add_argument("--tag", default="")
    parser.add_argument("--update-docs", action="store_true")
    parser.add_argument(
        "--plot", nargs="+", metavar="TAG", help="no run: draw the runs saved under these tags into docs/images/"
    )
    parser.add_argument("--image", default="", help="with --plot: the image's name (default capacity-MODEL.png)")
    args = parser.parse_args()
    if args.plot:
        path = DOCS.parent / "images" / (args.image or f"capacity-{args.model}.png")
        plot(args.model, args.plot, path)
        print(f"wrote {path}")
        return
    env = dict(item.split("=", 1) for item in args.env)
    clips = load_corpus()
    normalizer = english_normalizer()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/capacity.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "model": args.model,
        "seconds": args.seconds,
        "settings": env,
        "runs": [],
    }
    with ServerProcess(faster_whisper_folder(args.model), "cpu", env={"WARMUP": "true", **env}) as server:
        for clients in args.clients:
            summary = run(server, clips, clients, args.seconds, normalizer)
            print(json.dumps({k: v for k, v in summary.items() if k not in ("errors", "per_client")}), flush=True)
            report["runs"].append(summary)
    offline_seconds(args.model, env, clips, report["runs"], args.seconds)  # with the server stopped
    for summary in report["runs"]:
        print(f"{summary['clients']} clients: efficiency {summary['efficiency']}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"capacity-{args.model}{'-' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps(report, indent=1, default=asdict), encoding="utf-8")
    print(table(report))
    print(f"wrote {out}")
    if args.update_docs:
        update_docs(report)
        print(f"updated {DOCS}")


if __name__ == "__main__":
    main()
