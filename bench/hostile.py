"""The attacks of issue 14 against a real server, measured from outside: peak memory and CPU seconds
of the server process during each attack, and what a normal client connected meanwhile saw.

    python bench/hostile.py                      # this checkout
    python bench/hostile.py --project /tmp/old   # another checkout (e.g. a git worktree of an older commit)

Each run starts `python main.py` (the README's command, serving the installed tiny.en fallback)
in the project folder with API tokens set, runs the attacks one after another with the same
inputs, and writes bench/results/hostile-<tag>.json. Every attack is bounded by a timeout, so an
unprotected server is measured up to it ("timed_out": true).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import free_port, machine  # noqa: E402
from tests import hostile_media  # noqa: E402

TOKEN = "bench-token-alpha"
OTHER = "bench-token-beta"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ATTACK_TIMEOUT_S = 120.0
TICK = os.sysconf("SC_CLK_TCK")


class Server:
    def __init__(self, project: Path) -> None:
        self.project = project
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="rta-hostile-"))
        self.log = self.folder / "server.log"
        env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "AUDIO_STORAGE_DIR": str(self.folder / "audio"),
            "API_TOKENS": f"{TOKEN},{OTHER}",
            "MAX_SESSIONS": "8",
            "QUEUE_MAX_SIZE": "16",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(project),
        }
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "main.py"], cwd=project, env=env, stdout=sink, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 300
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the server in {project} did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.5)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/task"))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- the normal client ----------------------------------------------------------------------------


SENTENCE = "good morning everyone and welcome to the show"


def speech() -> Any:
    """A spoken sentence (espeak-ng), 16 kHz mono float32."""
    import io

    import numpy as np
    import soundfile as sf
    import soxr

    command = ["espeak-ng", "-v", "en-us", "-s", "160", "--stdout", SENTENCE]
    wav = subprocess.run(command, capture_output=True, check=True)
    samples, rate = sf.read(io.BytesIO(wav.stdout), dtype="float32")
    return np.asarray(soxr.resample(samples, rate, 16000), dtype=np.float32)


def speech_wav() -> bytes:
    from real_time_audio.audio.files import encode

    return encode(speech(), 16000, "wav")


async def normal_client(server: Server) -> dict[str, Any]:
    """A spoken sentence at real-time pace: how long `connected` took, how the session ended, its text."""
    from tests.conftest import pcm16

    audio = pcm16(speech())
    started = time.monotonic()
    try:
        async with websockets.connect(f"{server.ws}/ws/transcribe", additional_headers=AUTH, open_timeout=60) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 60))
            connected_s = time.monotonic() - started
            if first.get("status") != "connected":
                return {"connected_s": round(connected_s, 2), "outcome": first.get("code")}
            for offset in range(0, len(audio), 3200):
                await ws.send(audio[offset : offset + 3200])
                await asyncio.sleep(0.1)
            await ws.send(json.dumps({"type": "end"}))
            messages = [json.loads(raw) async for raw in ws]
            errors = [m["code"] for m in messages if m.get("type") == "error"]
            done = messages[-1].get("status") == "completed" if messages else False
            return {
                "connected_s": round(connected_s, 2),
                "outcome": "completed" if done else f"closed {ws.close_code}",
                "text": messages[-1].get("text") if done else None,
                "errors": errors,
                "total_s": round(time.monotonic() - started, 2),
            }
    except (OSError, TimeoutError, websockets.WebSocketException) as exc:
        return {"outcome": f"failed: {exc!r}"[:200], "connected_s": round(time.monotonic() - started, 2)}


# -- attacks --------------------------------------------------------------------------------------


async def send_stream(server: Server, encoding: str, data: bytes, slice_bytes: int = 1024) -> dict[str, Any]:
    async with websockets.connect(
        f"{server.ws}/ws/transcribe?encoding={encoding}", additional_headers=AUTH, max_size=None
    ) as ws:
        await ws.recv()
        try:
            for offset in range(0, len(data), slice_bytes):
                await ws.send(data[offset : offset + slice_bytes])
            await ws.send(json.dumps({"type": "end"}))
        except websockets.ConnectionClosed:
            pass
        messages = []
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in ws:
                messages.append(json.loads(raw))
        return {
            "close_code": ws.close_code,
            "errors": [m.get("message", "")[:160] for m in messages if m.get("type") == "error"],
            "duration_s": next((m["duration"] for m in messages if m.get("status") == "completed"), None),
        }


def ws_bomb(encoding: str, make: Callable[[], bytes]) -> Callable[[Server], Awaitable[dict[str, Any]]]:
    async def attack(server: Server) -> dict[str, Any]:
        data = make()
        result, normal = await asyncio.gather(send_stream(server, encoding, data), normal_client(server))
        return {"input_bytes": len(data), **result, "normal": normal}

    return attack


def post_file(server: Server, data: bytes, name: str, token: str = TOKEN, **fields: str) -> tuple[int, Any]:
    boundary = "benchboundary"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    )
    body += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n'.encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/v1/audio/transcriptions",
        data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=ATTACK_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


async def rest_bomb(server: Server) -> dict[str, Any]:
    data = hostile_media.flac_bomb(400)
    (status, body), normal = await asyncio.gather(
        asyncio.to_thread(post_file, server, data, "bomb.flac", response_format="verbose_json"), normal_client(server)
    )
    return {"input_bytes": len(data), "status": status, "duration": (body or {}).get("duration"), "normal": normal}


async def vanishing_clients(server: Server) -> dict[str, Any]:
    data = hostile_media.flac_bomb(60)

    async def vanish() -> None:
        ws = await websockets.connect(f"{server.ws}/ws/transcribe?encoding=flac", additional_headers=AUTH)
        await ws.recv()
        for offset in range(0, len(data), 200):
            await ws.send(data[offset : offset + 200])
        ws.transport.abort()

    await asyncio.gather(*(vanish() for _ in range(6)))
    normal = await normal_client(server)
    left = time.monotonic()
    while time.monotonic() - left < 60 and sessions(server) > 0:
        await asyncio.sleep(0.25)
    return {"normal": normal, "sessions_gone_after_s": round(time.monotonic() - left, 2), "open": sessions(server)}


def sessions(server: Server) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/ready", timeout=10) as response:
            return int(json.loads(response.read()).get("sessions", 0))
    except OSError:
        return -1


async def echo_flood(server: Server) -> dict[str, Any]:
    """Up to 1.5 GiB sent to /ws/echo by a client that never reads; a normal client meanwhile."""
    flood = asyncio.to_thread(
        hostile_media.flood_without_reading, server.port, "/ws/echo?delay=0", AUTH, 1500 << 20, 5.0
    )
    sent, normal = await asyncio.gather(flood, normal_client(server))
    return {"accepted_mib": round(sent / 2**20, 1), "normal": normal}


async def slow_uploads(server: Server) -> dict[str, Any]:
    socks = []
    for _ in range(32):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n".encode()
            + b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r"
        )
        socks.append(sock)
    await asyncio.sleep(1)
    normal = await normal_client(server)
    await asyncio.sleep(40)
    still_open = sum(1 for sock in socks if _open(sock))
    for sock in socks:
        sock.close()
    return {"normal": normal, "uploads_open_after_45_s": still_open}


async def half_open(server: Server) -> dict[str, Any]:
    socks = []
    for index in range(500):
        sock = socket.create_connection(("127.0.0.1", server.port))
        if index % 2:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        socks.append(sock)
    normal = await normal_client(server)
    await asyncio.sleep(30)
    still_open = sum(1 for sock in socks if _open(sock))
    for sock in socks:
        sock.close()
    return {"normal": normal, "open_after_30_s": still_open}


def _open(sock: socket.socket) -> bool:
    """Whether the server still holds the connection (whatever it answered before closing it)."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
        return False  # the end of the stream: closed by the server
    except BlockingIOError:
        return True  # nothing (more) to read and not closed
    except OSError:
        return False


async def tokens_in_log(server: Server) -> dict[str, Any]:
    subprotocol = "rta.token." + base64.urlsafe_b64encode(OTHER.encode()).decode().rstrip("=")
    for url, options in [
        (f"{server.ws}/ws/transcribe?token={TOKEN}", {}),
        (f"{server.ws}/ws/transcribe", {"subprotocols": ["rta.v1", subprotocol]}),
    ]:
        try:
            async with websockets.connect(url, **options) as ws:  # type: ignore[arg-type]
                await ws.recv()
                await ws.send(json.dumps({"type": "end"}))
                async for _ in ws:
                    pass
        except websockets.WebSocketException:
            pass
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/?token={TOKEN}", timeout=10):
        pass
    await asyncio.sleep(1)
    logged = server.log.read_text(errors="replace")
    return {"token_occurrences_in_log": logged.count(TOKEN) + logged.count(OTHER)}


async def poisoned_prompt(server: Server) -> dict[str, Any]:
    status, body = await asyncio.to_thread(
        post_file, server, speech_wav(), "a.wav", prompt="<|endoftext|> hello", response_format="json"
    )
    return {"status": status, "text": (body or {}).get("text") if isinstance(body, dict) else None}


async def other_token(server: Server) -> dict[str, Any]:
    normal = await normal_client(server)
    folder = server.folder / "audio"
    session_id = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime)[-1].name
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/sessions/{session_id}", headers={"Authorization": f"Bearer {OTHER}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return {"other_token_status": status, "normal": normal}


ATTACKS: dict[str, Callable[[Server], Awaitable[dict[str, Any]]]] = {
    "flac_bomb_ws": ws_bomb("flac", hostile_media.BOMBS["flac"]),
    "opus_bomb_ws": ws_bomb("ogg", hostile_media.BOMBS["ogg"]),
    "mp4_flac_bomb_ws": ws_bomb("mp4", hostile_media.BOMBS["mp4"]),
    "mulaw_1hz_wav_ws": ws_bomb("wav", lambda: hostile_media.mulaw_wav(500)),
    "flac_bomb_upload": rest_bomb,
    "vanishing_clients": vanishing_clients,
    "echo_never_read": echo_flood,
    "slow_uploads": slow_uploads,
    "half_open_connections": half_open,
    "tokens_in_log": tokens_in_log,
    "prompt_special_tokens": poisoned_prompt,
    "other_token_reads_record": other_token,
}


def measure(server: Server, name: str, attack: Callable[[Server], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    peak = server.rss_mib()
    start_rss, start_cpu, start_threads = peak, server.cpu_s(), server.threads()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.05):
            try:
                peak = max(peak, server.rss_mib())
            except OSError:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = asyncio.run(asyncio.wait_for(attack(server), ATTACK_TIMEOUT_S))
        timed_out = False
    except TimeoutError:
        result, timed_out = {}, True
    stop.set()
    sampler.join()
    alive = server.process.poll() is None
    return {
        "attack": name,
        "timed_out": timed_out,
        "server_alive": alive,
        "peak_rss_growth_mib": round(peak - start_rss, 1),
        "cpu_s": round(server.cpu_s() - start_cpu, 2) if alive else None,
        "threads_after": server.threads() - start_threads if alive else None,
        **result,
    }


def _normal(entry: dict[str, Any]) -> str:
    normal = entry.get("normal")
    if not normal:
        return "–"
    outcome = normal.get("outcome", "?")
    text = f', "{normal["text"]}"' if normal.get("text") else ""
    return f"{outcome}, connected in {normal.get('connected_s', '?')} s{text}"


def _effect(entry: dict[str, Any]) -> str:
    """The attack's own outcome, in a few words."""
    if entry.get("timed_out"):
        return f"still running after {ATTACK_TIMEOUT_S:.0f} s"
    keys = [
        ("close_code", "close {}"),
        ("status", "HTTP {}"),
        ("duration_s", "{} s of audio decoded"),
        ("duration", "{} s of audio decoded"),
        ("open", "{} sessions left open"),
        ("accepted_mib", "{} MiB accepted"),
        ("uploads_open_after_45_s", "{} of 32 uploads open after 45 s"),
        ("open_after_30_s", "{} of 500 open after 30 s"),
        ("token_occurrences_in_log", "{} tokens in the log"),
        ("other_token_status", "other token: HTTP {}"),
        ("text", '"{}"'),
    ]
    parts = [template.format(entry[key]) for key, template in keys if entry.get(key) is not None]
    return "; ".join(parts) or "–"


def table(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Markdown: each attack before and after, side by side."""
    old = {entry["attack"]: entry for entry in before["attacks"]}
    lines = [
        "| attack | before: peak RSS growth, CPU | before: outcome | before: normal client "
        "| after: peak RSS growth, CPU | after: outcome | after: normal client |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in after["attacks"]:
        was = old.get(entry["attack"], {})
        lines.append(
            f"| {entry['attack']} | {was.get('peak_rss_growth_mib', '–')} MiB, {was.get('cpu_s', '–')} s "
            f"| {_effect(was) if was else '–'} | {_normal(was)} "
            f"| {entry['peak_rss_growth_mib']} MiB, {entry['cpu_s']} s | {_effect(entry)} | {_normal(entry)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=ROOT, help="the checkout to serve (default: this one)")
    parser.add_argument("--tag", default="after")
    parser.add_argument("--only", nargs="*", choices=sorted(ATTACKS), help="run only these attacks")
    parser.add_argument("--table", nargs=2, type=Path, metavar=("BEFORE", "AFTER"), help="print two results as a table")
    args = parser.parse_args()
    if args.table:
        print(table(*(json.loads(path.read_text()) for path in args.table)))
        return
    report: dict[str, Any] = {"project": str(args.project), "machine": machine(), "attacks": []}
    for name in args.only or list(ATTACKS):
        server = Server(args.project)  # a fresh server per attack: no attack inherits another's damage
        try:
            entry = measure(server, name, ATTACKS[name])
        finally:
            server.stop()
        print(json.dumps(entry), flush=True)
        report["attacks"].append(entry)
    out = ROOT / "bench" / "results" / f"hostile-{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
