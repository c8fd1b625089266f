"""One long recording streamed as fast as the server will take it: memory must stay flat.

Starts the real server as a separate `uvicorn main:app` process (so its memory is its own), builds
`--minutes` of speech from ../shared/audio with pauses, and sends it over /ws/transcribe with no
pacing at all. Back-pressure (MAX_PENDING_AUDIO_S) must slow the sender instead of letting audio
pile up in the server. Every second the server's resident memory (VmRSS) is sampled. Reports the
peak RSS, RSS at each tenth of the stream, the number of finals, whether every byte was recorded
(sha256 of what was sent against the server's), and the wall time.

    python bench/fast_stream.py [--minutes 60] [--size tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.batch_vs_sequential import build_checkpoint  # noqa: E402
from bench.common import free_port, rss_mib, wait_ready  # noqa: E402
from bench.streaming_quality import RATE, speech_stream  # noqa: E402

FRAME_BYTES = 16384


async def send_all(url: str, pcm: bytes, progress: list[int]) -> list[dict[str, Any]]:
    import websockets

    messages: list[dict[str, Any]] = []
    async with websockets.connect(url, max_size=None, ping_timeout=None) as ws:  # see client/session.py
        messages.append(json.loads(await ws.recv()))

        async def reader() -> None:
            async for raw in ws:
                messages.append(json.loads(raw))

        task = asyncio.create_task(reader())
        for offset in range(0, len(pcm), FRAME_BYTES):
            await ws.send(pcm[offset : offset + FRAME_BYTES])
            progress[0] = offset + FRAME_BYTES
        await ws.send("END")
        await asyncio.wait_for(task, 3600)
    return messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--checkpoint", type=Path, help="a Whisper folder (default: build a random one)")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    checkpoint = args.checkpoint or build_checkpoint(args.size, Path(f"/tmp/whisper-{args.size}-random-eot16"), 16)
    audio, utterances = speech_stream(args.minutes, args.seed)
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    del audio
    port = free_port()
    storage = Path(tempfile.mkdtemp(prefix="bench-fast-stream-"))
    env = {
        **os.environ,
        "TRANSCRIPTION_MODEL_ID": str(checkpoint),
        "AUDIO_STORAGE_DIR": str(storage),
        "HF_HUB_OFFLINE": "1",
        "LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    try:
        wait_ready(port, process)
        idle_rss = rss_mib(process.pid)
        samples: list[tuple[float, float, float]] = []  # (wall s, audio s sent, RSS MiB)
        progress = [0]
        done = threading.Event()

        def sample() -> None:
            started = time.monotonic()
            while not done.is_set():
                samples.append((time.monotonic() - started, progress[0] / 2 / RATE, rss_mib(process.pid)))
                if len(samples) % 60 == 0:
                    wall, sent, rss = samples[-1]
                    print(f"{wall:6.0f} s: {sent / 60:6.1f} min of audio sent, server RSS {rss:.0f} MiB", flush=True)
                time.sleep(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        messages = asyncio.run(send_all(f"ws://127.0.0.1:{port}/ws/transcribe", pcm, progress))
        wall = time.monotonic() - started
        done.set()
        sampler.join()
    finally:
        process.terminate()
        process.wait(60)

    completed = messages[-1]
    finals = [m for m in messages if m.get("type") == "transcription" and m["is_final"]]
    errors = [m for m in messages if m.get("type") == "error"]
    total_s = len(pcm) / 2 / RATE
    tenths = [
        next((round(rss, 1) for _, sent, rss in samples if sent >= total_s * k / 10), round(samples[-1][2], 1))
        for k in range(1, 11)
    ]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "checkpoint": str(checkpoint),
        "audio_minutes": round(total_s / 60, 2),
        "utterances": len(utterances),
        "wall_s": round(wall, 1),
        "speed_x_real_time": round(total_s / wall, 2),
        "finals": len(finals),
        "errors": errors,
        "completed": completed.get("status") == "completed",
        "sha256_match": completed.get("recording", {}).get("sha256") == hashlib.sha256(pcm).hexdigest(),
        "bytes_recorded": completed.get("recording", {}).get("bytes"),
        "bytes_sent": len(pcm),
        "rss_mib_idle": round(idle_rss, 1),
        "rss_mib_peak": round(max(rss for _, _, rss in samples), 1),
        "rss_mib_at_each_tenth_of_the_audio": tenths,
    }
    print(json.dumps(report, indent=2))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "fast_stream.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "fast_stream_rss.json").write_text(json.dumps(samples) + "\n")


if __name__ == "__main__":
    main()
