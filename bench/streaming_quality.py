"""Cost over time and final latency of one long live stream through the real server.

Builds a stream of English speech clips from ../shared/audio separated by random pauses, serves the
app with uvicorn (in this process, on a free port), and streams the audio to /ws/transcribe at
real time (or `--speed` times real time) with the websockets client. It reports:

- model seconds per audio second in each minute of the stream (minute 1 against the last);
- the latency of each utterance's last final: wall time from the moment the utterance's last
  sample was sent to the moment the final arrived (this includes the VAD's silence wait).

    python bench/streaming_quality.py [--minutes 10] [--speed 1] [--size tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.batch_vs_sequential import SHARED, build_checkpoint  # noqa: E402
from real_time_audio.config import load_settings  # noqa: E402

RATE = 16000
FRAME_S = 0.1


@functools.cache
def english_clips() -> tuple[np.ndarray, ...]:
    """The English speech clips of ../shared/audio at 16 kHz mono (read once per process)."""
    import soundfile as sf
    import soxr

    folder = SHARED / "audio"
    files = [folder / "jfk.wav", folder / "picovoice" / "test_en.wav", *sorted(folder.glob("librispeech/*.wav"))]
    files += sorted(folder.glob("espeak/*.wav"))
    if not all(f.exists() for f in files):
        sys.exit(f"speech clips not found under {folder}")
    clips = []
    for path in files:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
        clips.append(soxr.resample(data.mean(axis=1), rate, RATE).astype(np.float32))
    return tuple(clips)


def speech_stream(minutes: float, seed: int, first: int = 0) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Clips from ../shared/audio in a fixed rotation (from clip `first`) with 1-3 s pauses.

    Returns the audio and each utterance's (start, end) in seconds.
    """
    clips = english_clips()
    rng = np.random.default_rng(seed)
    pieces, utterances, position, total = [], [], 0, int(minutes * 60 * RATE)
    index = first
    while position < total:
        pause = np.zeros(int(rng.uniform(1.0, 3.0) * RATE), dtype=np.float32)
        clip = clips[index % len(clips)]
        index += 1
        pieces += [pause, clip]
        utterances.append(((position + len(pause)) / RATE, (position + len(pause) + len(clip)) / RATE))
        position += len(pause) + len(clip)
    pieces.append(np.zeros(2 * RATE, dtype=np.float32))
    return np.concatenate(pieces), utterances


async def stream(
    url: str, audio: np.ndarray, speed: float, marks: list[tuple[float, float]]
) -> list[tuple[float, Any]]:
    """Send at `speed` × real time; returns (arrival time, message) pairs. `marks` gets (audio s, wall s)."""
    import websockets

    received: list[tuple[float, Any]] = []
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    step = int(FRAME_S * RATE) * 2
    async with websockets.connect(url, max_size=None) as ws:
        await ws.recv()

        async def reader() -> None:
            async for raw in ws:
                received.append((time.monotonic(), json.loads(raw)))

        task = asyncio.create_task(reader())
        start = time.monotonic()
        for offset in range(0, len(pcm), step):
            audio_time = (offset + step) / 2 / RATE
            delay = start + audio_time / speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send(pcm[offset : offset + step])
            marks.append((min(audio_time, len(audio) / RATE), time.monotonic()))
        await ws.send("END")
        await asyncio.wait_for(task, 600)
    return received


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--checkpoint", type=Path, help="a Whisper folder (default: build a random one)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--speed", type=float, default=1.0, help="times real time")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import uvicorn

    from bench.common import free_port
    from main import create_app

    checkpoint = args.checkpoint or build_checkpoint(args.size, Path(f"/tmp/whisper-{args.size}-random-eot16"), 16)
    audio, utterances = speech_stream(args.minutes, args.seed)
    settings = load_settings(
        transcription_model_id=str(checkpoint),
        audio_storage_dir=Path("/tmp/bench-streaming-audio"),
        log_level="WARNING",
    )
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.1)
    engine = app.state.server.engine

    model_by_minute: list[float] = []
    marks: list[tuple[float, float]] = []

    def sample_engine() -> None:  # model seconds used by the end of each minute of sent audio
        minute = 1
        while thread.is_alive() and minute * 60 <= len(audio) / RATE:
            if marks and marks[-1][0] >= minute * 60:
                model_by_minute.append(engine.stats.model_seconds)
                minute += 1
            time.sleep(0.02)

    sampler = threading.Thread(target=sample_engine, daemon=True)
    sampler.start()
    received = asyncio.run(stream(f"ws://127.0.0.1:{port}/ws/transcribe", audio, args.speed, marks))
    sampler.join(5)
    server.should_exit = True
    thread.join(30)

    per_minute = np.diff([0.0, *model_by_minute]) / 60
    sent_at = dict(marks)
    audio_times = np.array([a for a, _ in marks])
    latencies = []
    finals = [(at, m) for at, m in received if m.get("type") == "transcription" and m["is_final"]]
    for start, end in utterances:
        mine = [(at, m) for at, m in finals if start - 0.3 <= m["start"] and m["end"] <= end + 0.6]
        if not mine or end > audio_times[-1]:
            continue
        frame_end = float(audio_times[np.searchsorted(audio_times, end)])
        latencies.append(mine[-1][0] - sent_at[frame_end])
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        "checkpoint": str(checkpoint),
        "minutes": args.minutes,
        "speed": args.speed,
        "utterances": len(utterances),
        "utterances_with_finals": len(latencies),
        "model_s_per_audio_s_by_minute": [round(x, 4) for x in per_minute],
        "minute_1_vs_last_change_pct": round(100 * (per_minute[-1] - per_minute[0]) / per_minute[0], 1)
        if len(per_minute) > 1
        else None,
        "final_latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "final_latency_p95_s": round(float(np.percentile(latencies, 95)), 3) if latencies else None,
        "engine": {"batches": engine.stats.batches, "jobs": engine.stats.jobs_completed},
    }
    print(json.dumps(report, indent=2))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "streaming_quality.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
