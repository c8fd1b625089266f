"""`load`: N clients at once, each streaming a file; a table of what each one saw."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from real_time_audio.audio.files import write_audio
from rta_client.offline import synthesize
from rta_client.session import ClientError, ClientOptions
from rta_client.stream import stream_file

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "A live transcription server should keep up with every speaker at once.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese, and a snack.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "She can scoop these things into three red bags, and we will go meet her.",
    "The weather today is cold and windy, with rain expected in the evening.",
    "Numbers like forty two and nineteen eighty four are easy to say aloud.",
]


@dataclass(slots=True)
class ClientReport:
    client: int
    file: str
    ok: bool
    audio_s: float = 0.0
    finals: int = 0
    first_partial_s: float | None = None
    final_s: float | None = None
    sha256_ok: bool = False
    problem: str = ""


def generated_speech(count: int, folder: Path) -> list[Path]:
    """`count` different spoken sentences (espeak-ng), as 16 kHz WAV files in `folder`."""
    paths = []
    for index in range(count):
        samples, rate = synthesize(f"Client {index + 1}. " + SENTENCES[index % len(SENTENCES)])
        path = folder / f"speech-{index + 1}.wav"
        write_audio(path, samples, rate)
        paths.append(path)
    return paths


async def _one(index: int, path: Path, options: ClientOptions, chunk_size: int, realtime: bool) -> ClientReport:
    report = ClientReport(client=index + 1, file=path.name, ok=False)
    client_options = ClientOptions(**{name: getattr(options, name) for name in ClientOptions.__slots__})
    client_options.encoding = "auto"  # each file says what it is
    try:
        result = await stream_file(path, client_options, chunk_size=chunk_size, realtime=realtime)
    except ClientError as exc:
        report.problem = str(exc)
        return report
    report.ok = result.ok
    report.finals = len(result.finals)
    report.sha256_ok = result.sha256_ok
    report.audio_s = float(result.completed["duration"]) if result.completed else 0.0
    if result.first_text_at is not None and result.first_audio_at is not None:
        report.first_partial_s = result.first_text_at - result.first_audio_at
    if result.completed_at is not None and result.end_sent_at is not None:
        report.final_s = result.completed_at - result.end_sent_at
    report.problem = "; ".join(result.problems())
    return report


async def run_load(
    files: list[Path], clients: int, options: ClientOptions, *, chunk_size: int = 8192, realtime: bool = False
) -> tuple[list[ClientReport], float]:
    """Start `clients` sessions together (file i % len(files) each); returns the reports and wall time."""
    started = time.monotonic()
    reports = await asyncio.gather(
        *(_one(index, files[index % len(files)], options, chunk_size, realtime) for index in range(clients))
    )
    return list(reports), time.monotonic() - started


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def print_table(reports: list[ClientReport], wall_s: float, out: TextIO) -> None:
    header = (
        f"{'client':>6}  {'file':<22} {'ok':<4} {'audio s':>8} {'finals':>6} {'1st text s':>10} {'final s':>8}  sha256"
    )
    out.write(header + "\n")
    for r in reports:
        out.write(
            f"{r.client:>6}  {r.file[:22]:<22} {'yes' if r.ok else 'NO':<4} {r.audio_s:>8.2f} {r.finals:>6} "
            f"{_seconds(r.first_partial_s):>10} {_seconds(r.final_s):>8}  {'match' if r.sha256_ok else 'MISMATCH'}"
            + (f"  ({r.problem})" if r.problem else "")
            + "\n"
        )
    firsts = [r.first_partial_s for r in reports if r.first_partial_s is not None]
    finals = [r.final_s for r in reports if r.final_s is not None]
    audio = sum(r.audio_s for r in reports)
    out.write(
        f"summary: {sum(r.ok for r in reports)}/{len(reports)} ok, "
        f"{sum(r.sha256_ok for r in reports)}/{len(reports)} sha256 match, "
        f"first text p50 {_seconds(statistics.median(firsts) if firsts else None)} s "
        f"p95 {_seconds(_percentile(firsts, 0.95))} s, "
        f"final p50 {_seconds(statistics.median(finals) if finals else None)} s "
        f"p95 {_seconds(_percentile(finals, 0.95))} s, "
        f"{audio:.1f} s of audio in {wall_s:.1f} s wall ({audio / wall_s if wall_s else 0:.2f}x real time)\n"
    )


async def load_command(
    files: list[Path], clients: int, options: ClientOptions, chunk_size: int, realtime: bool, out: TextIO
) -> int:
    with tempfile.TemporaryDirectory(prefix="load-speech-") as folder:
        if not files:
            files = generated_speech(min(clients, len(SENTENCES)), Path(folder))
        reports, wall_s = await run_load(files, clients, options, chunk_size=chunk_size, realtime=realtime)
    print_table(reports, wall_s, out)
    return 0 if all(r.ok for r in reports) else 1
