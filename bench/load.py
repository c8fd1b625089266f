"""Load generator: N live speakers over the real /ws/transcribe protocol, and what each one saw.

Each client streams its own speech (the ../shared/audio clips in a rotation that starts at a
different clip per client, separated by random 1-3 s pauses) as 16-bit PCM frames of 100 ms,
each sent when its audio would exist in real time. For every utterance it measures:

- final latency: arrival of a final minus the moment the last audio frame of its utterance was
  sent. A final committed while the utterance still goes on (a long utterance split by the VAD
  or by the agreement policy) is measured from the last audio it was decoded from instead: the
  audio sent by its arrival less its `lag`;
- first-text latency: arrival of the first transcription (partial or final) of the utterance
  minus the moment its first audio frame was sent;
- the `lag` of every transcription, error messages, abnormal closes, utterances that got no
  final, how late the client itself sent (send slip) and whether the server's recording has the
  SHA-256 of what was sent.

    python bench/load.py --url ws://127.0.0.1:8000/ws/transcribe --clients 4 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import concurrent.futures
import hashlib
import itertools
import json
import multiprocessing
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.streaming_quality import RATE, speech_stream  # noqa: E402

FRAME_S = 0.1
REPLY_TIMEOUT_S = 600.0


@dataclass(slots=True)
class ClientRecord:
    """What one client sent and saw."""

    client: int
    audio_s: float
    utterances: int
    final_latency_s: list[float] = field(default_factory=list)
    final_audio_s: list[float] = field(default_factory=list)  # where in the stream each final's utterance ends
    first_text_latency_s: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    finals: int = 0
    missed: int = 0  # utterances that ended inside the stream and got no final
    errors: list[str] = field(default_factory=list)
    send_slip_max_s: float = 0.0
    completed: bool = False
    sha256_match: bool = False
    close_code: int | None = None


@dataclass(slots=True)
class Received:
    at: float  # time.monotonic() of arrival
    message: dict[str, Any]


def client_audio(client: int, seconds: float) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """The speech client `client` says: reproducible, and different from every other client's."""
    return speech_stream(seconds / 60, seed=1000 + client, first=client)


def sent_time(frame_ends: list[float], frame_walls: list[float], audio_s: float) -> float:
    """Wall time at which the frame holding audio second `audio_s` was sent."""
    index = min(bisect.bisect_left(frame_ends, audio_s - 1e-9), len(frame_ends) - 1)
    return frame_walls[index]


def audio_sent_by(frame_ends: list[float], frame_walls: list[float], wall: float) -> float:
    """Seconds of audio sent by wall time `wall`."""
    index = bisect.bisect_right(frame_walls, wall)
    return frame_ends[index - 1] if index else 0.0


def analyse(
    record: ClientRecord,
    utterances: list[tuple[float, float]],
    frame_ends: list[float],
    frame_walls: list[float],
    received: list[Received],
) -> None:
    """Attribute every transcription to an utterance and fill in the record's latencies."""
    texts = [r for r in received if r.message.get("type") == "transcription"]
    record.lags = [float(r.message["lag"]) for r in texts]
    record.finals = sum(1 for r in texts if r.message["is_final"])
    if not frame_ends:
        return
    # A transcription belongs to the utterance whose stretch (up to the middle of the pauses on
    # either side) holds the middle of its words.
    borders = [(a[1] + b[0]) / 2 for a, b in itertools.pairwise(utterances)]
    by_utterance: dict[int, list[Received]] = {}
    for r in texts:
        middle = (float(r.message["start"]) + float(r.message["end"])) / 2
        by_utterance.setdefault(bisect.bisect_right(borders, middle), []).append(r)
    sent_until = frame_ends[-1]
    for index, (start, end) in enumerate(utterances):
        if end > sent_until:
            continue
        mine = sorted(by_utterance.get(index, []), key=lambda r: r.at)
        if mine:
            record.first_text_latency_s.append(mine[0].at - sent_time(frame_ends, frame_walls, start))
        finals = [r for r in mine if r.message["is_final"]]
        if not finals:
            record.missed += 1
            continue
        end_sent = sent_time(frame_ends, frame_walls, end)
        for position, final in enumerate(finals):
            if position == len(finals) - 1 and final.at >= end_sent:
                reference = end_sent
            else:  # a piece committed before the utterance ended: from the last audio it was decoded from
                decoded_until = audio_sent_by(frame_ends, frame_walls, final.at) - float(final.message["lag"])
                reference = sent_time(frame_ends, frame_walls, min(max(decoded_until, start), end))
            record.final_latency_s.append(final.at - reference)
            record.final_audio_s.append(end)


async def stream_client(
    url: str,
    client: int,
    seconds: float,
    start_at: float,
    speech: tuple[np.ndarray, list[tuple[float, float]]] | None = None,
    received: list[Received] | None = None,
) -> ClientRecord:
    """One live speaker: stream at real-time pace from `start_at` (monotonic), then END. `speech`:
    the audio and its utterances (default: `client_audio`); `received` collects every message."""
    import websockets

    audio, utterances = speech if speech is not None else client_audio(client, seconds)
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    record = ClientRecord(client=client, audio_s=round(len(audio) / RATE, 2), utterances=len(utterances))
    step = int(FRAME_S * RATE) * 2
    frame_ends: list[float] = []
    frame_walls: list[float] = []
    received = received if received is not None else []
    try:
        async with websockets.connect(url, max_size=None, ping_timeout=None, open_timeout=120) as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), 120))
            if hello.get("type") == "error":
                record.errors.append(f"{hello.get('code')}: {hello.get('message')}")

            async def reader() -> None:
                async for raw in ws:
                    if isinstance(raw, str):
                        received.append(Received(time.monotonic(), json.loads(raw)))

            task = asyncio.create_task(reader())
            await asyncio.sleep(max(0.0, start_at - time.monotonic()))
            started = time.monotonic()
            for offset in range(0, len(pcm), step):
                audio_end = min(offset + step, len(pcm)) / 2 / RATE
                due = started + audio_end
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await ws.send(pcm[offset : offset + step])
                now = time.monotonic()
                record.send_slip_max_s = max(record.send_slip_max_s, now - due)
                frame_ends.append(audio_end)
                frame_walls.append(now)
            await ws.send("END")
            try:
                await asyncio.wait_for(task, REPLY_TIMEOUT_S)
            except TimeoutError:
                record.errors.append(f"no close within {REPLY_TIMEOUT_S:.0f} s of END")
            record.close_code = ws.close_code
    except (OSError, TimeoutError, websockets.WebSocketException) as exc:
        record.errors.append(f"{type(exc).__name__}: {exc}")
    for r in received:
        message = r.message
        if message.get("type") == "error":
            record.errors.append(f"{message.get('code')}: {message.get('message')}")
        elif message.get("type") == "status" and message.get("status") == "completed":
            record.completed = True
            record.sha256_match = message.get("recording", {}).get("sha256") == hashlib.sha256(pcm).hexdigest()
    if record.close_code not in (None, 1000):
        record.errors.append(f"closed with {record.close_code}")
    analyse(record, utterances, frame_ends, frame_walls, received)
    return record


async def _clients(url: str, clients: list[int], seconds: float, start_at: float) -> list[ClientRecord]:
    return list(await asyncio.gather(*(stream_client(url, c, seconds, start_at) for c in clients)))


def _run_in_process(url: str, clients: list[int], seconds: float, start_at: float) -> list[dict[str, Any]]:
    return [asdict(r) for r in asyncio.run(_clients(url, clients, seconds, start_at))]


def run_load(url: str, clients: int, seconds: float, processes: int = 1, setup_s: float = 3.0) -> list[ClientRecord]:
    """`clients` speakers at once, spread over `processes` client processes; all start together."""
    processes = max(1, min(processes, clients))
    if processes == 1:
        start_at = time.monotonic() + setup_s
        return asyncio.run(_clients(url, list(range(clients)), seconds, start_at))
    # CLOCK_MONOTONIC is shared by all processes, so one start time holds for all of them.
    start_at = time.monotonic() + setup_s + 5.0
    shares = [list(range(clients))[i::processes] for i in range(processes)]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        parts = pool.map(_run_in_process, [url] * processes, shares, [seconds] * processes, [start_at] * processes)
        records = [ClientRecord(**r) for part in parts for r in part]
    return sorted(records, key=lambda r: r.client)


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def summarise(records: list[ClientRecord]) -> dict[str, Any]:
    """The figures of one load run, over all clients."""
    latencies = [x for r in records for x in r.final_latency_s]
    first = [x for r in records for x in r.first_text_latency_s]
    lags = [x for r in records for x in r.lags]
    utterances = sum(r.utterances for r in records)
    return {
        "clients": len(records),
        "audio_s": round(sum(r.audio_s for r in records), 1),
        "utterances": utterances,
        "finals": sum(r.finals for r in records),
        "missed_utterances": sum(r.missed for r in records),
        "final_latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "final_latency_p95_s": percentile(latencies, 95),
        "final_latency_max_s": round(max(latencies), 3) if latencies else None,
        "first_text_p50_s": round(statistics.median(first), 3) if first else None,
        "first_text_p95_s": percentile(first, 95),
        "lag_p95_s": percentile(lags, 95),
        "lag_max_s": round(max(lags), 3) if lags else None,
        "send_slip_max_s": round(max((r.send_slip_max_s for r in records), default=0.0), 3),
        "errors": [f"client {r.client}: {e}" for r in records for e in r.errors],
        "completed": sum(r.completed for r in records),
        "sha256_match": sum(r.sha256_match for r in records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws/transcribe")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0, help="audio each client streams")
    parser.add_argument("--processes", type=int, default=1, help="client processes (for hundreds of clients)")
    parser.add_argument("--json", type=Path, help="also write every client's record here")
    args = parser.parse_args()
    records = run_load(args.url, args.clients, args.seconds, args.processes)
    summary = summarise(records)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "clients": [asdict(r) for r in records]}, indent=2))


if __name__ == "__main__":
    main()
