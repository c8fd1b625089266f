"""Wall time of one batched inference of N jobs against N sequential single-job inferences.

Uses the server's own backend (`WhisperBackend.transcribe_batch`: batched feature extraction and
one `generate`) on a Whisper architecture with random weights built by
../shared/tools/make_whisper_checkpoint.py, fed with the speech clips in ../shared/audio.

    python bench/batch_vs_sequential.py [--size tiny] [--jobs 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from real_time_audio.config import load_settings  # noqa: E402
from real_time_audio.service import TranscriptionRequest  # noqa: E402
from real_time_audio.whisper.backend import WhisperBackend  # noqa: E402

SHARED = ROOT.parent / "shared"


def build_checkpoint(size: str, out: Path, eot_after: int) -> Path:
    if (out / "config.json").exists():
        return out
    tool = SHARED / "tools" / "make_whisper_checkpoint.py"
    if not tool.exists():
        sys.exit(f"{tool} not found: pass --checkpoint with a Whisper folder instead")
    command = [sys.executable, str(tool), size, str(out)]
    if eot_after:
        command += ["--eot-after", str(eot_after)]
    subprocess.run(command, check=True)
    return out


def speech_clips(count: int, seconds: float) -> list[np.ndarray]:
    """Real speech from ../shared/audio, cut to `seconds`, different for each job."""
    import soundfile as sf
    import soxr

    files = sorted((SHARED / "audio").rglob("*.wav"))
    clips = []
    for index in range(count):
        if files:
            data, rate = sf.read(files[index % len(files)], dtype="float32", always_2d=True)
            mono = soxr.resample(data.mean(axis=1), rate, 16000)
            offset = int(index // len(files) * 16000 * 0.5)
            clip = np.resize(mono[offset:], int(seconds * 16000))
        else:
            clip = np.random.default_rng(index).standard_normal(int(seconds * 16000)) * 0.1
        clips.append(clip.astype(np.float32))
    return clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--checkpoint", type=Path, help="existing Whisper folder (skips building one)")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0, help="audio per job")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--eot-after",
        type=int,
        default=16,
        help="make decoding stop after ~N tokens like a trained model (0 = run to the cap)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "batch_vs_sequential.json")
    args = parser.parse_args()

    checkpoint = args.checkpoint or build_checkpoint(
        args.size, Path("/tmp") / f"whisper-{args.size}-random-eot{args.eot_after}", args.eot_after
    )
    backend = WhisperBackend.load(load_settings(transcription_model_id=str(checkpoint), device=args.device))
    requests = [TranscriptionRequest(audio=clip, language="en") for clip in speech_clips(args.jobs, args.seconds)]

    def timed(run: object) -> float:
        started = time.perf_counter()
        run()  # type: ignore[operator]
        if backend.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        return time.perf_counter() - started

    def batched() -> None:
        backend.transcribe_batch(requests)

    def sequential() -> None:
        for request in requests:
            backend.transcribe_batch([request])

    batched()
    sequential()  # warm-up of both shapes
    batch_times, sequential_times = [], []
    for _ in range(args.repeats):
        batch_times.append(timed(batched))
        sequential_times.append(timed(sequential))
    tokens = [r.tokens for r in backend.transcribe_batch(requests)]
    result = {
        "size": args.size,
        "checkpoint": str(checkpoint),
        "device": backend.device,
        "jobs": args.jobs,
        "seconds_per_job": args.seconds,
        "repeats": args.repeats,
        "eot_after": args.eot_after,
        "tokens_per_job": tokens,
        "batched_s_median": statistics.median(batch_times),
        "sequential_s_median": statistics.median(sequential_times),
        "batched_s": batch_times,
        "sequential_s": sequential_times,
        "machine": f"{platform.machine()} {platform.processor() or ''} cores={__import__('os').cpu_count()}".strip(),
    }
    result["speedup"] = result["sequential_s_median"] / result["batched_s_median"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(
        f"| {args.size} | {backend.device} | {args.jobs} jobs × {args.seconds:g} s | "
        f"batched {result['batched_s_median']:.3f} s | sequential {result['sequential_s_median']:.3f} s | "
        f"speed-up ×{result['speedup']:.2f} |"
    )
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
