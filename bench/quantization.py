"""What QUANTIZATION=int8 costs in accuracy and saves in time, on real weights, layer group by group.

Each clip of the corpus is decoded whole, offline (plain transformers, greedy, as bench/accuracy.py
does), by the model in float32 and with the linear layers of one group in int8 through the
server's own `quantize_int8`:

- all: every linear layer (what QUANTIZATION=int8 does);
- decoder: the decoder's layers and the vocabulary projection;
- projection: the vocabulary projection alone (51,864 outputs, read once per token);
- encoder: the encoder's layers.

Reported per model and group: WER and CPER against the references (as in bench/accuracy.py), how
many clips read exactly as in float32, and the wall time of the pass; then the time of the encoder
on one 30 s window and of one decoder step with four rows, float32 against all-int8.

    python bench/quantization.py                        # tiny.en and base (about 8 minutes on 2 cores)
    python bench/quantization.py --models tiny.en --groups all
    python bench/quantization.py --update-docs          # rewrite the block in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.accuracy import english_normalizer, offline, score  # noqa: E402
from bench.common import machine, replace_docs_block  # noqa: E402
from bench.corpus import SHARED, load_corpus  # noqa: E402
from bench.real_models import transformers_folder  # noqa: E402
from real_time_audio.whisper.backend import quantize_int8  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
GROUPS: dict[str, Callable[[str], bool] | None] = {
    "float32": None,
    "all": lambda name: True,
    "decoder": lambda name: name.startswith("model.decoder.") or name == "proj_out",
    "projection": lambda name: name == "proj_out",
    "encoder": lambda name: name.startswith("model.encoder."),
}


def median_time(call: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of `call`, after one warm-up call."""
    call()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def model_times(model: Any, features: Any) -> tuple[float, float]:
    """The encoder on one 30 s window, and one decoder step (with the vocabulary projection) of four rows."""
    import torch

    with torch.inference_mode():
        encoder = median_time(lambda: model.model.encoder(features), 7)
        encoded = model.model.encoder(features).last_hidden_state.expand(4, -1, -1)
        ids = torch.full((4, 4), model.generation_config.decoder_start_token_id)
        prompt = model.model.decoder(input_ids=ids, encoder_hidden_states=encoded, use_cache=True)

        def decoder_step() -> None:
            # A copy of the same cache every time, so each call is one step at the same depth.
            cache = copy.deepcopy(prompt.past_key_values)
            out = model.model.decoder(
                input_ids=ids[:, :1], encoder_hidden_states=encoded, past_key_values=cache, use_cache=True
            )
            model.proj_out(out.last_hidden_state)

        copying = median_time(lambda: copy.deepcopy(prompt.past_key_values), 21)
        step = max(0.0, median_time(decoder_step, 21) - copying)
    return encoder, step


def kernel_times(model_dir: Path, audio: Any) -> dict[str, float]:
    """float32 against all-int8: the encoder on a 30 s window of `audio`, and one decoder step."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(model_dir)
    features = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    times: dict[str, float] = {}
    for label in ("float32", "int8"):
        model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        if label == "int8":
            quantize_int8(model)
        encoder, step = model_times(model, features)
        times[f"encoder_30s_{label}"] = round(encoder, 4)
        times[f"decoder_step_{label}"] = round(step, 4)
    return times


def table(report: dict[str, Any]) -> str:
    lines = [
        "| model | linear layers in int8 | WER | CPER | clips as in float32 | decode time |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, groups in report["models"].items():
        for group, s in groups.items():
            lines.append(
                f"| {name} | {group if group != 'float32' else 'none (float32)'} | {s['wer']:.2f} % | "
                f"{s['cper']:.2f} % | {s['same']} of {report['corpus']['clips']} | {s['seconds']:.1f} s |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"], choices=["tiny.en", "base"])
    parser.add_argument("--groups", nargs="+", default=[g for g in GROUPS if g != "float32"], choices=list(GROUPS))
    parser.add_argument("--corpus", default="full", choices=["core", "full"])
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()
    if not (SHARED / "whisper-assets" / "english.json").is_file():
        sys.exit(f"needs {SHARED} (the English normalizer and speech clips)")
    clips = load_corpus(args.corpus)
    normalizer = english_normalizer()
    words = sum(len(normalizer(c.text).split()) for c in clips)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/quantization.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "corpus": {"name": args.corpus, "clips": len(clips), "words": words},
        "models": {},
        "kernels": {},
        "texts": {},
    }
    for name in args.models:
        folder = transformers_folder(name)
        offline(folder, clips[:3])  # warm-up, so the first timed pass is not the slowest
        baseline = offline(folder, clips)
        runs = {"float32": baseline}
        for group in args.groups:
            include = GROUPS[group]
            runs[group] = offline(folder, clips, lambda model, include=include: quantize_int8(model, include))
        report["models"][name] = {}
        for group, results in runs.items():
            summary = score(clips, results, baseline, normalizer)
            summary["same"] = sum(r.text == b.text for r, b in zip(results, baseline, strict=True))
            summary["seconds"] = round(sum(r.seconds for r in results), 2)
            report["models"][name][group] = summary
            print(f"  {name:8} {group:10} {summary}", flush=True)
        report["texts"][name] = {group: [r.text for r in results] for group, results in runs.items()}
        report["kernels"][name] = kernel_times(folder, clips[0].audio)
        print(f"  {name:8} kernels    {report['kernels'][name]}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "quantization.json"
    out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    body = table(report)
    kernels = "; ".join(
        f"{name}: encoder on 30 s {k['encoder_30s_float32']:.3f} → {k['encoder_30s_int8']:.3f} s, "
        f"decoder step (4 rows) {1000 * k['decoder_step_float32']:.1f} → {1000 * k['decoder_step_int8']:.1f} ms"
        for name, k in report["kernels"].items()
    )
    text = (
        f"{len(clips)} clips, {words} words, each decoded whole; {report['machine']['cpu']}, "
        f"{report['machine']['cores']} cores; command `{report['command']}`.\n\n{body}\n\n"
        f"float32 → all-int8: {kernels}.\n"
    )
    print(text)
    print(f"wrote {out}")
    if args.update_docs:
        replace_docs_block(DOCS, "<!-- quantization:begin -->", "<!-- quantization:end -->", text)
        print(f"updated {DOCS}")


if __name__ == "__main__":
    main()
