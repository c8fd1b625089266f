"""Accuracy of live streaming against offline decoding, on real speech with real Whisper weights.

For each model (tiny.en and base, real weights from the package registry, served from their
faster-whisper folders through the server's own converter) and each clip of a corpus of real
English speech with reference transcripts (bench/corpus.py):

- offline: plain transformers, greedy, each clip decoded whole (long-form past 30 s);
- realtime: the clip streamed to a real server process over /ws/transcribe as 100 ms PCM frames at
  real-time pace, followed by 2 s of silence (the speaker stops; the server finalizes on its own),
  then END;
- fast: the same frames sent as fast as the server accepts them (its back-pressure paces them);
- replay: the realtime stream through the server's own session pipeline and backend in this
  process, on a virtual clock (bench/replay.py): a frame every 100 ms, every decode taking
  `--replay-decode-s`. The same every run, so two settings can be compared word for word, where
  the realtime runs of one setting differ by a few words from run to run. `--runs N` streams the
  realtime and fast modes N times (a fresh server each time) and reports their mean WER with each
  run's.

Reported per model and mode:

- WER: word error rate against the reference, both sides through Whisper's English normalizer;
- CPER: the case and punctuation error rate against the reference written with case and
  punctuation (bench/corpus.py). The two texts are aligned on their folded words (lower case, no
  punctuation); of the words both have, the share written differently (case, or punctuation
  attached to the word) is the CPER. Offline has its own; streaming should be as close to it as
  its WER is. The JSON also keeps `cper_vs_offline`: the same count against the offline transcript,
  the measure of the first figures (0 for offline by construction);
- partials and revised partials (a partial whose words do not extend the previous partial of the
  same segment), finals per clip;
- final latency (realtime, replay): arrival of a clip's last final minus the moment its last
  sample was sent (replay: in virtual time).

    python bench/accuracy.py                       # both models, all modes (about 30 min on 2 cores)
    python bench/accuracy.py --models tiny.en --modes offline realtime --limit 8
    python bench/accuracy.py --modes replay --clips corpus --env COMMIT_DELAY_S=4 --tag d4   # word for word
    python bench/accuracy.py --update-docs         # rewrite the accuracy block of docs/benchmarks.md
    python bench/accuracy.py --corpus core         # the 24 clips of the first figures
    python bench/accuracy.py --project /tmp/old    # serve another checkout (a git worktree of an older commit)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import ServerProcess, machine, replace_docs_block  # noqa: E402
from bench.corpus import SHARED, Clip, load_corpus  # noqa: E402
from bench.real_models import faster_whisper_folder, transformers_folder  # noqa: E402

RATE = 16000
FRAME_S = 0.1
TRAILING_SILENCE_S = 2.0
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- accuracy:begin -->", "<!-- accuracy:end -->"
MODES = ("offline", "realtime", "fast", "replay")
REPLAY_DECODE_S = 0.3  # a full-window tiny.en decode on two cores takes about this long


# ---------------------------------------------------------------------------------------------
# Text measures


def english_normalizer() -> Any:
    """Whisper's English text normalizer (transformers' port) with its spelling table."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    spelling = json.loads((SHARED / "whisper-assets" / "english.json").read_text(encoding="utf-8"))
    return EnglishTextNormalizer(spelling)


def edit_alignment(ref: list[str], hyp: list[str]) -> tuple[int, list[tuple[int, int]]]:
    """Word edit distance, and the (ref index, hyp index) pairs aligned as matches."""
    rows, cols = len(ref) + 1, len(hyp) + 1
    cost = np.zeros((rows, cols), dtype=np.int32)
    cost[:, 0] = np.arange(rows)
    cost[0, :] = np.arange(cols)
    for i in range(1, rows):
        for j in range(1, cols):
            same = ref[i - 1] == hyp[j - 1]
            cost[i, j] = min(cost[i - 1, j] + 1, cost[i, j - 1] + 1, cost[i - 1, j - 1] + (0 if same else 1))
    pairs: list[tuple[int, int]] = []
    i, j = rows - 1, cols - 1
    while i > 0 and j > 0:
        same = ref[i - 1] == hyp[j - 1]
        if cost[i, j] == cost[i - 1, j - 1] + (0 if same else 1):
            if same:
                pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif cost[i, j] == cost[i - 1, j] + 1:
            i -= 1
        else:
            j -= 1
    return int(cost[-1, -1]), pairs[::-1]


def fold(token: str) -> str:
    """A word with case and punctuation removed, for aligning surface forms."""
    return re.sub(r"[^\w']", "", token.casefold())


def case_punctuation_errors(reference: str, text: str) -> tuple[int, int]:
    """(words written differently, words both texts have) after aligning on the folded words."""
    a = [t for t in reference.split() if fold(t)]
    b = [t for t in text.split() if fold(t)]
    _, pairs = edit_alignment([fold(t) for t in a], [fold(t) for t in b])
    return sum(1 for i, j in pairs if a[i] != b[j]), len(pairs)


# ---------------------------------------------------------------------------------------------
# The three ways to transcribe


@dataclass(slots=True)
class ClipResult:
    clip: str
    text: str
    finals: int = 0
    partials: int = 0
    revised: int = 0
    final_latency_s: float | None = None
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    run: int = 1  # which of the mode's runs (--runs) this is


def offline(model_dir: Path, clips: list[Clip], prepare: Callable[[Any], object] | None = None) -> list[ClipResult]:
    """Plain transformers: each clip whole, greedy (long-form with timestamps past 30 s).
    `prepare` may change the loaded model first (bench/quantization.py quantizes it)."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(model_dir)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    if prepare is not None:
        prepare(model)
    options: dict[str, Any] = (
        {"language": "en", "task": "transcribe"} if model.generation_config.is_multilingual else {}
    )
    results = []
    for clip in clips:
        started = time.perf_counter()
        long = len(clip.audio) > 30 * RATE
        features = processor(
            clip.audio,
            sampling_rate=RATE,
            return_tensors="pt",
            truncation=not long,
            padding="longest" if long else "max_length",
            return_attention_mask=True,
        )
        with torch.inference_mode():
            ids = model.generate(
                features.input_features,
                attention_mask=features.attention_mask,
                return_timestamps=long,
                num_beams=1,
                do_sample=False,
                **options,
            )
        text = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
        results.append(ClipResult(clip.name, text, seconds=time.perf_counter() - started))
    return results


async def stream_clip(url: str, clip: Clip, realtime: bool) -> ClipResult:
    """One session: the clip (and trailing silence) as PCM frames, then END; what came back."""
    import websockets

    audio = np.concatenate([clip.audio, np.zeros(int(TRAILING_SILENCE_S * RATE), dtype=np.float32)])
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    frame = int(FRAME_S * RATE) * 2
    clip_end_frame = -(-len(clip.audio) * 2 // frame)  # the frame holding the clip's last sample
    result = ClipResult(clip.name, "")
    finals: list[tuple[int, str, float]] = []
    last_partial: dict[int, list[str]] = {}
    clip_end_sent = 0.0
    started = time.perf_counter()
    async with websockets.connect(url, max_size=None, open_timeout=60) as ws:
        assert json.loads(await ws.recv())["status"] == "connected"

        async def receive() -> None:
            async for raw in ws:
                message = json.loads(raw)
                if message["type"] == "transcription":
                    words = message["text"].split()
                    if message["is_final"]:
                        finals.append((message["segment_id"], message["text"], time.perf_counter()))
                        last_partial.pop(message["segment_id"], None)
                    else:
                        previous = last_partial.get(message["segment_id"])
                        if previous is not None and words[: len(previous)] != previous:
                            result.revised += 1
                        last_partial[message["segment_id"]] = words
                        result.partials += 1
                elif message["type"] == "error":
                    result.errors.append(f"{message['code']}: {message['message']}")
                elif message.get("status") == "completed":
                    return

        receiver = asyncio.create_task(receive())
        t0 = time.perf_counter()
        for index, offset in enumerate(range(0, len(pcm), frame)):
            if realtime:
                await asyncio.sleep(max(0.0, t0 + index * FRAME_S - time.perf_counter()))
            await ws.send(pcm[offset : offset + frame])
            if index + 1 == clip_end_frame:
                clip_end_sent = time.perf_counter()
        await ws.send("END")
        await asyncio.wait_for(receiver, 600)
    finals.sort()
    result.text = " ".join(text for _, text, _ in finals).strip()
    result.finals = len(finals)
    if realtime and finals:
        result.final_latency_s = max(at for _, _, at in finals) - clip_end_sent
    result.seconds = time.perf_counter() - started
    return result


def streamed(
    model_folder: Path, clips: list[Clip], realtime: bool, env: dict[str, str], project: Path = ROOT
) -> list[ClipResult]:
    """Every clip through a real server (the checkout `project`) serving `model_folder`, one session at a time."""
    with ServerProcess(model_folder, "cpu", env={"WARMUP": "true", **env}, project=project) as server:
        return [asyncio.run(stream_clip(server.url, clip, realtime)) for clip in clips]


def replayed(model_folder: Path, clips: list[Clip], env: dict[str, str], decode_s: float) -> list[ClipResult]:
    """Every clip through the server's session pipeline and backend in this process, on a virtual
    clock (bench/replay.py), with the server's settings and `env` as a server would read them."""
    from bench.replay import FRAME_S as REPLAY_FRAME_S
    from bench.replay import replay_pcm16
    from real_time_audio.audio.vad import SileroScorer
    from real_time_audio.config import load_settings
    from real_time_audio.whisper.backend import WhisperBackend

    overrides: dict[str, Any] = {name.lower(): value for name, value in env.items()}
    settings = load_settings(**{"transcription_model_id": str(model_folder), "model_fallback": False, **overrides})
    backend = WhisperBackend.load(settings)
    scorer = SileroScorer.shared()
    frame = round(REPLAY_FRAME_S * RATE)
    results = []
    for clip in clips:
        started = time.perf_counter()
        audio = np.concatenate([clip.audio, np.zeros(int(TRAILING_SILENCE_S * RATE), dtype=np.float32)])
        heard = replay_pcm16(settings, backend, scorer, audio, decode_s)
        clip_end = -(-len(clip.audio) // frame) * REPLAY_FRAME_S  # when the frame with its last sample arrived
        results.append(
            ClipResult(
                clip.name,
                heard.text,
                finals=len(heard.finals),
                partials=heard.partials,
                revised=heard.revised,
                final_latency_s=max(heard.final_at) - clip_end if heard.final_at else None,
                seconds=time.perf_counter() - started,
            )
        )
    return results


# ---------------------------------------------------------------------------------------------
# Scoring and reporting


def score(clips: list[Clip], results: list[ClipResult], reference: list[ClipResult], normalizer: Any) -> dict[str, Any]:
    errors = words = 0
    cp_errors = cp_words = 0
    off_errors = off_words = 0
    for clip, result, base in zip(clips, results, reference, strict=True):
        ref = normalizer(clip.text).split()
        hyp = normalizer(result.text).split()
        distance, _ = edit_alignment(ref, hyp)
        errors += distance
        words += len(ref)
        wrong, both = case_punctuation_errors(clip.styled, result.text)
        cp_errors += wrong
        cp_words += both
        wrong, both = case_punctuation_errors(base.text, result.text)
        off_errors += wrong
        off_words += both
    latencies = [r.final_latency_s for r in results if r.final_latency_s is not None]
    summary: dict[str, Any] = {
        "wer": round(100 * errors / max(1, words), 2),
        "cper": round(100 * cp_errors / max(1, cp_words), 2),
        "cper_vs_offline": round(100 * off_errors / max(1, off_words), 2),
        "words": words,
        "finals": sum(r.finals for r in results),
        "partials": sum(r.partials for r in results),
        "revised": sum(r.revised for r in results),
        "errors": sum(len(r.errors) for r in results),
    }
    if latencies:
        ordered = sorted(latencies)
        summary["latency_p50_s"] = round(statistics.median(ordered), 2)
        summary["latency_p95_s"] = round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 2)
    return summary


def score_runs(
    clips: list[Clip], runs: list[list[ClipResult]], reference: list[ClipResult], normalizer: Any
) -> dict[str, Any]:
    """The figures of a mode run `len(runs)` times: the error rates over all runs together (their
    mean, as every run has the same words), each run's WER, and the counts per run."""
    summary = score(clips * len(runs), [r for run in runs for r in run], reference * len(runs), normalizer)
    if len(runs) > 1:
        for name in ("finals", "partials", "revised", "errors"):
            summary[name] = round(summary[name] / len(runs))
        summary["words"] //= len(runs)
        summary["runs"] = len(runs)
        summary["wer_runs"] = [score(clips, run, reference, normalizer)["wer"] for run in runs]
    return summary


def table(report: dict[str, Any]) -> str:
    lines = [
        "| model | mode | WER | CPER | finals | partials (revised) | final latency p50 / p95 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, modes in report["models"].items():
        for mode, s in modes.items():
            latency = f"{s['latency_p50_s']:.2f} / {s['latency_p95_s']:.2f} s" if "latency_p50_s" in s else "–"
            partials = f"{s['partials']} ({s['revised']})" if mode != "offline" else "–"
            finals = str(s["finals"]) if mode != "offline" else "–"
            wer = f"{s['wer']:.2f} %"
            if "wer_runs" in s:
                wer += f" (mean of {s['runs']}: {min(s['wer_runs']):.2f}–{max(s['wer_runs']):.2f})"
            lines.append(f"| {model} | {mode} | {wer} | {s['cper']:.2f} % | {finals} | {partials} | {latency} |")
    return "\n".join(lines)


def update_docs(report: dict[str, Any]) -> None:
    corpus = report["corpus"]
    body = (
        f"Corpus: {corpus['clips']} clips, {corpus['minutes']:.1f} min, {corpus['words']} reference words. "
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; "
        f"{report['date']}; command `{report['command']}`.\n\n{table(report)}"
    )
    replace_docs_block(DOCS, BEGIN, END, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"], choices=["tiny.en", "base"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--corpus", default="full", choices=["core", "full"], help="the clips (bench/corpus.py)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N clips (quick checks)")
    parser.add_argument("--clips", nargs="+", default=[], metavar="TEXT", help="only clips named with one of these")
    parser.add_argument("--project", type=Path, default=ROOT, help="the checkout to serve (default: this one)")
    parser.add_argument("--tag", default="", help="suffix for the result file (runs with other settings)")
    parser.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE", help="server settings for this run")
    parser.add_argument(
        "--replay-decode-s", type=float, default=REPLAY_DECODE_S, help="virtual seconds per decode in replay mode"
    )
    parser.add_argument(
        "--runs", type=int, default=1, help="stream each clip this many times in the realtime and fast modes"
    )
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()
    if not (SHARED / "whisper-assets" / "english.json").is_file():
        sys.exit(f"needs {SHARED} (the English normalizer and speech clips)")
    env = dict(item.split("=", 1) for item in args.env)
    clips = load_corpus(args.corpus)
    if args.clips:
        clips = [c for c in clips if any(text in c.name for text in args.clips)]
    if args.limit:
        clips = clips[: args.limit]
    normalizer = english_normalizer()
    words = sum(len(normalizer(c.text).split()) for c in clips)
    minutes = sum(len(c.audio) for c in clips) / RATE / 60
    print(f"corpus: {len(clips)} clips, {minutes:.1f} min, {words} words", flush=True)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/accuracy.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "settings": env,
        "replay_decode_s": args.replay_decode_s,
        "project": str(args.project.resolve()),
        "corpus": {"name": args.corpus, "clips": len(clips), "minutes": round(minutes, 2), "words": words},
        "models": {},
        "clips": {},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"accuracy{'-' + args.tag if args.tag else ''}.json"
    for name in args.models:
        hf = transformers_folder(name)
        reference = offline(hf, clips)
        runs: dict[str, list[list[ClipResult]]] = {"offline": [reference]}
        for mode in args.modes:
            if mode == "offline":
                continue
            started = time.perf_counter()
            if mode == "replay":
                if args.project.resolve() != ROOT:
                    sys.exit("--modes replay runs this checkout's code; it cannot be combined with --project")
                runs[mode] = [replayed(faster_whisper_folder(name), clips, env, args.replay_decode_s)]
            else:  # a real server's timing differs from run to run, and so may its words
                runs[mode] = [
                    [
                        replace(r, run=run)
                        for r in streamed(faster_whisper_folder(name), clips, mode == "realtime", env, args.project)
                    ]
                    for run in range(1, args.runs + 1)
                ]
            print(f"{name} {mode}: {time.perf_counter() - started:.0f} s", flush=True)
        report["models"][name] = {mode: score_runs(clips, r, reference, normalizer) for mode, r in runs.items()}
        report["clips"][name] = {mode: [asdict(x) for run in r for x in run] for mode, r in runs.items()}
        for mode, s in report["models"][name].items():
            print(f"  {name:8} {mode:9} {s}", flush=True)
        out.write_text(json.dumps(report, indent=1), encoding="utf-8")  # each model as soon as it is done
    print(table(report))
    print(f"wrote {out}")
    if args.update_docs:
        update_docs(report)
        print(f"updated {DOCS}")


if __name__ == "__main__":
    main()
