"""What hearing a decode in a sized encoder window (ENCODER_WINDOW=sized) changes, on real weights.

The server's own backend (`WhisperBackend.transcribe_batch`) decodes the same audio with the
encoder on full 30 s windows and on sized windows (the audio plus each pad given, the rest read
as the encoding of silence), and reports for each pad, against the full windows:

- whole clips (every corpus clip of at most 29 s, as an utterance that ended): WER against the
  references, and how many texts are identical to the full-window text;
- cut windows (the first 2, 3.5, 5, 7 and 10 s of the longer clips, as the partial decodes of an
  utterance still being spoken see it): the share of words that differ from the full-window
  text, and how many texts are identical;
- the wall time of each pass, and of the encoder alone on one 30 s window and one 7 s window.

    python bench/encoder_window.py                         # tiny.en and base, pads 2, 5 and 10 s
    python bench/encoder_window.py --models base --pads 3 5 8
    python bench/encoder_window.py --update-docs           # rewrite the block in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.accuracy import edit_alignment, english_normalizer  # noqa: E402
from bench.common import machine, replace_docs_block  # noqa: E402
from bench.corpus import load_corpus  # noqa: E402
from bench.real_models import faster_whisper_folder  # noqa: E402

RATE = 16000
CUTS_S = (2.0, 3.5, 5.0, 7.0, 10.0)
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- encoder-window:begin -->", "<!-- encoder-window:end -->"


def word_errors(reference: str, hypothesis: str, normalizer: Any) -> tuple[int, int]:
    words = normalizer(reference).split()
    return edit_alignment(words, normalizer(hypothesis).split())[0], len(words)


def measure(model: str, pads: list[float]) -> dict[str, Any]:
    import torch

    from real_time_audio.config import load_settings
    from real_time_audio.service import TranscriptionRequest
    from real_time_audio.whisper.backend import WhisperBackend
    from real_time_audio.whisper.decoding import encode_sized, padding_level

    clips = [c for c in load_corpus() if len(c.audio) <= 29 * RATE]
    cuts = [c.audio[: int(s * RATE)] for c in clips for s in CUTS_S if len(c.audio) > s * RATE * 1.3]
    normalizer = english_normalizer()
    settings = load_settings(transcription_model_id=str(faster_whisper_folder(model)), device="cpu", warmup=False)
    backend = WhisperBackend.load(settings)

    def decode(window: str, pad: float, audio: list[np.ndarray]) -> tuple[list[str], float]:
        backend.encoder_window, backend.encoder_pad_s = window, pad
        started = time.perf_counter()
        texts = [backend.transcribe_batch([TranscriptionRequest(audio=a, language="en")])[0].text for a in audio]
        return texts, time.perf_counter() - started

    encoder = backend.model.get_encoder()
    mel = backend.processor.feature_extractor(
        [clips[0].audio[: 5 * RATE]], sampling_rate=RATE, return_tensors="pt"
    ).input_features
    silence = backend._silence_at(padding_level(mel)[0])
    sinks = backend._padding_sinks()
    timings: dict[str, Any] = {}
    with torch.inference_mode():
        for name, run in (
            ("encoder_30s_s", lambda: encoder(mel)),
            ("encoder_7s_s", lambda: encode_sized(encoder, mel, 350, [silence], sinks=sinks)),
        ):
            run()
            started = time.perf_counter()
            for _ in range(5):
                run()
            timings[name] = round((time.perf_counter() - started) / 5, 4)

    timings["encoding_error_pct"] = encoding_errors(backend, cuts, sinks)
    full_clips, full_clip_s = decode("full", 0, [c.audio for c in clips])
    full_cuts, full_cut_s = decode("full", 0, cuts)
    errors = [word_errors(c.text, t, normalizer) for c, t in zip(clips, full_clips, strict=True)]
    rows: list[dict[str, Any]] = [
        {
            "window": "full",
            "clip_wer": round(100 * sum(e for e, _ in errors) / sum(n for _, n in errors), 2),
            "clips_identical": len(clips),
            "cut_words_differing": 0.0,
            "cuts_identical": len(cuts),
            "seconds": round(full_clip_s + full_cut_s, 1),
        }
    ]
    for pad in pads:
        texts, clip_s = decode("sized", pad, [c.audio for c in clips])
        cut_texts, cut_s = decode("sized", pad, cuts)
        errors = [word_errors(c.text, t, normalizer) for c, t in zip(clips, texts, strict=True)]
        differing = [word_errors(f, t, normalizer) for f, t in zip(full_cuts, cut_texts, strict=True)]
        rows.append(
            {
                "window": f"sized, pad {pad:g} s",
                "clip_wer": round(100 * sum(e for e, _ in errors) / sum(n for _, n in errors), 2),
                "clips_identical": sum(a == b for a, b in zip(full_clips, texts, strict=True)),
                "cut_words_differing": round(
                    100 * sum(e for e, _ in differing) / max(1, sum(n for _, n in differing)), 2
                ),
                "cuts_identical": sum(a == b for a, b in zip(full_cuts, cut_texts, strict=True)),
                "seconds": round(clip_s + cut_s, 1),
            }
        )
    return {"model": model, "machine": machine(), "clips": len(clips), "cuts": len(cuts), **timings, "rows": rows}


def encoding_errors(backend: Any, cuts: list[np.ndarray], sinks: list[int]) -> dict[str, float]:
    """How far the sized encoding of each cut window's own frames (5 s pad) is from the full
    window's (norm of the difference over the norm, in %, mean over the cuts): as the server
    computes it, without the sinks, and with only two padding frames computed (nearly the
    silence alone)."""
    import torch

    from real_time_audio.whisper.decoding import FRAMES_PER_SECOND, encode_sized, padding_level, sized_window_s

    encoder = backend.model.get_encoder()
    variants = {"server": {"sinks": sinks}, "no_sinks": {"sinks": []}, "two_frames": {"sinks": [], "stride": 10**6}}
    errors: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for audio in cuts:
            mel = backend.processor.feature_extractor([audio], sampling_rate=RATE, return_tensors="pt").input_features
            frames = round(sized_window_s(len(audio) / RATE, 5.0, 1.0) * FRAMES_PER_SECOND)
            full = encoder(mel).last_hidden_state[:, :frames]
            tails = [backend._silence_at(padding_level(mel)[0])]
            for name, options in variants.items():
                sized = encode_sized(encoder, mel, frames, tails, **options).encoded
                errors[name].append(float((sized - full).norm() / full.norm()))
    return {name: round(100 * float(np.mean(values)), 2) for name, values in errors.items()}


def table(reports: list[dict[str, Any]], arguments: str) -> str:
    first = reports[0]
    lines = [
        f"{first['clips']} whole clips and {first['cuts']} cut windows; {first['machine']['cpu']}, "
        f"{first['machine']['cores']} cores; command `python bench/encoder_window.py {arguments}`.",
        "",
        "| model | window | whole clips: WER (identical to full) | cut windows: words differing (identical) | time |",
        "| --- | --- | --- | --- | --- |",
    ]
    for report in reports:
        for row in report["rows"]:
            lines.append(
                f"| {report['model']} | {row['window']} | {row['clip_wer']:.2f} % ({row['clips_identical']}) | "
                f"{row['cut_words_differing']:.2f} % ({row['cuts_identical']}) | {row['seconds']} s |"
            )
    timings = "; ".join(f"{r['model']} {r['encoder_30s_s']} s on 30 s, {r['encoder_7s_s']} s on 7 s" for r in reports)
    lines += ["", f"The encoder alone, one row: {timings}."]
    errors = "; ".join(
        f"{r['model']} {e['server']} % (without the sinks {e['no_sinks']} %, "
        f"two padding frames only {e['two_frames']} %)"
        for r in reports
        for e in [r["encoding_error_pct"]]
    )
    lines += [
        "",
        "The cut windows' encoding at a 5 s pad, off the full window's "
        f"(norm of the difference over the norm, mean): {errors}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"], choices=["tiny.en", "base"])
    parser.add_argument("--pads", nargs="+", type=float, default=[2.0, 5.0, 10.0])
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()
    reports = [measure(model, args.pads) for model in args.models]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "encoder-window.json"
    out.write_text(json.dumps(reports, indent=1), encoding="utf-8")
    text = table(reports, " ".join(sys.argv[1:]).strip())
    print(text)
    print(f"wrote {out}")
    if args.update_docs:
        replace_docs_block(DOCS, BEGIN, END, text)
        print(f"updated {DOCS}")


if __name__ == "__main__":
    main()
