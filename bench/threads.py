"""What torch's threads buy one decode on the CPU (why INFERENCE_THREADS=auto gives each worker fewer).

The server's own backend decodes the same 5 s of real speech (the first corpus clip longer than
that) in batches of 1 and 4 rows, with torch on 1 thread and on every core, and reports the wall
time and the process CPU time of one call (the mean of four, after one untimed call):

    python bench/threads.py                    # tiny.en
    python bench/threads.py --model base --rows 1 2 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from bench.corpus import load_corpus  # noqa: E402
from bench.real_models import faster_whisper_folder  # noqa: E402

RATE = 16000
CALLS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny.en", choices=["tiny.en", "base"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4])
    args = parser.parse_args()

    import torch

    from real_time_audio.config import load_settings
    from real_time_audio.service import TranscriptionRequest
    from real_time_audio.whisper.backend import WhisperBackend

    cores = torch.get_num_threads()
    settings = load_settings(transcription_model_id=str(faster_whisper_folder(args.model)), device="cpu", warmup=False)
    backend = WhisperBackend.load(settings)
    clip = next(c for c in load_corpus() if len(c.audio) > 5 * RATE).audio[: 5 * RATE]
    report = []
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        for rows in args.rows:
            requests = [TranscriptionRequest(audio=clip, language="en")] * rows
            backend.transcribe_batch(requests)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(CALLS):
                backend.transcribe_batch(requests)
            row = {
                "threads": threads,
                "rows": rows,
                "wall_s": round((time.perf_counter() - wall) / CALLS, 3),
                "cpu_s": round((time.process_time() - cpu) / CALLS, 3),
            }
            report.append(row)
            print(f"{threads} thread(s), {rows} row(s): {row['wall_s']} s wall, {row['cpu_s']} s CPU per call")
    out = ROOT / "bench" / "results" / f"threads-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "machine": machine(), "calls": report}, indent=1), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
