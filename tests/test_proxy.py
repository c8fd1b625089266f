"""Two real server processes behind a real nginx, configured with deploy/nginx/rta.conf: routing on
readiness, a full replica, and a rolling restart in the middle of live sessions.

The harness plays the part Kubernetes plays in a cluster: it polls each replica's /ready (as a
readiness probe does) and lists in nginx's upstream only the replicas that answer 200, reloading
nginx when that changes (as the ingress controller follows a Service's endpoints). Open
connections stay where they are across a reload. When no replica is ready it lists them all, so a
client is told 1013 by a server rather than 502 by the proxy.

Needs nginx (Debian package; `make test` installs it as root), espeak-ng and the real tiny.en model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from websockets.sync.client import connect

from tests.conftest import PROJECT_ROOT, free_port, needs_espeak, pcm16, seconds
from tests.test_browser import ARTIFACTS, CHROMEDRIVER, CHROMIUM, chromium, wait_for
from tests.test_real_model import SENTENCES
from tests.test_server_process import BIN, server_env

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
TOKEN = "proxy-token-3"
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
pytestmark = [
    pytest.mark.slow,
    needs_espeak,
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (make test installs it as root)"),
]


class Replica:
    """One production server process: gunicorn with gunicorn.conf.py, as in the container."""

    def __init__(self, name: str, model: Path, folder: Path, **settings: str) -> None:
        self.name = name
        self.port = free_port()
        self.storage = folder / f"audio-{name}"
        self.log = folder / f"{name}.log"
        env = server_env(model, self.storage, HOST="127.0.0.1", PORT=str(self.port), API_TOKENS=TOKEN, **settings)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "main:app"],
                cwd=PROJECT_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends the workers with the master
            )

    def ready(self) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=2) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")
        except OSError:
            return 0, {}

    def records(self) -> list[dict[str, Any]]:
        """Every session this replica recorded: its session.json, audio payload and finals."""
        found = []
        for meta_path in sorted(self.storage.glob("*/session.json")):
            meta = json.loads(meta_path.read_text())
            audio = (meta_path.parent / "audio.wav").read_bytes()[44:]
            transcript = meta_path.parent / "transcript.jsonl"
            lines = transcript.read_text().splitlines() if transcript.exists() else []
            found.append(meta | {"pcm": audio, "finals": [json.loads(line)["text"] for line in lines]})
        return found

    def stop(self) -> None:
        """Kill the master and its workers (a killed master alone would leave its worker running)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


class Proxy:
    """nginx with the shipped site file, and a readiness poller that edits its upstream."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.service: list[Replica] = []  # the replicas of the "Service"; the ready ones get traffic
        self.upstream: list[Replica] = []
        self.changes: list[tuple[float, list[str]]] = []
        site = (PROJECT_ROOT / "deploy" / "nginx" / "rta.conf").read_text()
        assert site.count("listen 80;") == 1
        (folder / "site.conf").write_text(site.replace("listen 80;", f"listen 127.0.0.1:{self.port};"))
        user = "user root;\n" if os.geteuid() == 0 else ""
        (folder / "nginx.conf").write_text(
            f"{user}worker_processes 1;\ndaemon off;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log info;\n"
            "events { worker_connections 512; }\n"
            "http {\n  access_log off;\n"
            + "".join(
                f"  {kind}_temp_path {folder}/{kind};\n"
                for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            )
            + f"  include {folder}/upstream.conf;\n  include {folder}/site.conf;\n}}\n"
        )
        self._stop = threading.Event()
        self.process: subprocess.Popen[bytes] | None = None

    def _write_upstream(self, replicas: list[Replica]) -> None:
        servers = "".join(f"    server 127.0.0.1:{r.port};\n" for r in replicas)
        (self.folder / "upstream.conf").write_text(f"upstream rta_replicas {{\n{servers}}}\n")

    def start(self, replicas: list[Replica]) -> None:
        self.service = list(replicas)
        self.upstream = list(replicas)
        self._write_upstream(self.upstream)
        assert NGINX is not None
        self.process = subprocess.Popen([NGINX, "-c", str(self.folder / "nginx.conf"), "-p", str(self.folder)])
        deadline = time.monotonic() + seconds(20)
        while not (self.folder / "nginx.pid").exists():
            assert self.process.poll() is None and time.monotonic() < deadline, (self.folder / "error.log").read_text()
            time.sleep(0.05)
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        """The readiness probe and endpoint controller: every 100 ms."""
        while not self._stop.is_set():
            ready = [r for r in self.service if r.ready()[0] == 200]
            wanted = ready or list(self.service)
            if [r.name for r in wanted] != [r.name for r in self.upstream]:
                self._write_upstream(wanted)
                subprocess.run(
                    [str(NGINX), "-c", str(self.folder / "nginx.conf"), "-p", str(self.folder), "-s", "reload"],
                    check=True,
                )
                self.upstream = wanted
                self.changes.append((time.monotonic(), [r.name for r in wanted]))
            self._stop.wait(0.1)

    def _signal(self, name: str) -> None:
        command = [str(NGINX), "-c", str(self.folder / "nginx.conf"), "-p", str(self.folder), "-s", name]
        subprocess.run(command, check=True, capture_output=True)

    def routes_to(self, names: list[str], timeout_s: float = 20) -> None:
        deadline = time.monotonic() + seconds(timeout_s)
        while [r.name for r in self.upstream] != names:
            assert time.monotonic() < deadline, f"upstream is {[r.name for r in self.upstream]}, not {names}"
            time.sleep(0.05)
        time.sleep(0.3)  # the reload has started new workers

    def stop(self) -> None:
        self._stop.set()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(seconds(10))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def running(*things: Replica | Proxy) -> Iterator[None]:
    try:
        yield
    finally:
        for thing in things:
            thing.stop()


def wait_until(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + seconds(timeout_s)
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def started(meta: dict[str, Any]) -> float:
    return datetime.fromisoformat(meta["started_at"]).timestamp()


def ended(meta: dict[str, Any]) -> float:
    return datetime.fromisoformat(meta["ended_at"]).timestamp()


class PausingClient(threading.Thread):
    """A session through the proxy that speaks, stays quiet for a while (pings and keepalives
    only), then speaks again and ends."""

    def __init__(self, url: str, first: bytes, second: bytes, pause_s: float) -> None:
        super().__init__(daemon=True)
        self.url, self.first, self.second, self.pause_s = url, first, second, pause_s
        self.messages: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.pongs = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with connect(self.url, additional_headers={"Authorization": f"Bearer {TOKEN}"}, max_size=None) as ws:
                self.messages.append(json.loads(ws.recv(timeout=seconds(30))))
                for piece in range(0, len(self.first), 3200):
                    ws.send(self.first[piece : piece + 3200])
                deadline = time.monotonic() + self.pause_s
                while time.monotonic() < deadline:
                    ws.send(json.dumps({"type": "keepalive"}))
                    if ws.ping().wait(seconds(10)):
                        self.pongs += 1
                    with contextlib.suppress(TimeoutError):
                        while True:
                            self.messages.append(json.loads(ws.recv(timeout=2.0)))
                for piece in range(0, len(self.second), 3200):
                    ws.send(self.second[piece : piece + 3200])
                ws.send("END")
                for raw in ws:
                    self.messages.append(json.loads(raw))
                self.close_code = ws.close_code
        except BaseException as exc:  # reported by the test
            self.error = exc


def refusal_through(url: str) -> tuple[dict[str, Any], int | None]:
    with connect(url, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        message = json.loads(ws.recv(timeout=seconds(30)))
        with contextlib.suppress(Exception):
            ws.recv(timeout=seconds(30))
        return message, ws.close_code


def plain(text: str) -> str:
    """Whisper's English normalization (lower case, no punctuation, "we'll" = "we will"): a
    contraction one session writes and another does not is the same word."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return str(EnglishTextNormalizer({})(text))


def finals_text(messages: list[dict[str, Any]]) -> str:
    finals = [m for m in messages if m.get("type") == "transcription" and m["is_final"]]
    return " ".join(m["text"] for m in sorted(finals, key=lambda m: m["segment_id"]))


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="chromium and chromium-driver are not installed")
def test_a_rolling_restart_behind_nginx_loses_no_word(
    tmp_path: Path, real_model_dir: Path, say: Callable[[str], np.ndarray]
) -> None:
    """Replica A serves the CLI and the page until it is full (1013, not ready); B joins and takes
    the next session; A gets SIGTERM in mid-speech: both clients get their finals and 1001, carry on
    on B, and each one's joined transcript is the whole speech."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By

    pause = np.zeros(16000, dtype=np.float32)
    # About 25 s, still going when the restart comes. tiny.en hears SENTENCES[1]'s "tonight" as "to
    # hide" after some prompts, a model error that has nothing to do with the restart: left out.
    # The second utterance is long (5 s): the restart comes inside it.
    spoken = (SENTENCES[0], f"{SENTENCES[2]} and {SENTENCES[3]}", SENTENCES[0], SENTENCES[2], SENTENCES[3])
    speech = np.concatenate([pause, *(piece for text in spoken for piece in (say(text), pause)), pause])
    # SIGTERM once the recording of its first half second is on disk (it lags up to 1 s, and the
    # server reads what is in flight): the cut falls 1 to 3 s into the 5 s utterance.
    long_start = len(pause) + len(say(spoken[0])) + len(pause)
    cut_bytes = (long_start + 8000) * 2
    raw = tmp_path / "speech.raw"
    raw.write_bytes(pcm16(speech))
    wav = tmp_path / "speech.wav"
    soundfile.write(wav, speech, 16000, subtype="PCM_16")
    expected = plain(" ".join(spoken))

    settings = {"VAD": "silero", "DRAIN_TIMEOUT_S": "30", "LOG_FORMAT": "json"}
    a = Replica("a", real_model_dir, tmp_path, MAX_SESSIONS="2", **settings)
    b = Replica("b", real_model_dir, tmp_path, MAX_SESSIONS="3", **settings)
    proxy = Proxy(tmp_path)
    with running(proxy, a, b), chromium(wav) as driver:
        wait_until(lambda: a.ready()[0] == 200 and b.ready()[0] == 200, 180, "both replicas to load the model")
        proxy.start([a])  # B is the new version, not yet rolled out
        base = f"127.0.0.1:{proxy.port}"
        url = f"ws://{base}/ws/transcribe"

        # The CLI streams the speech at a speaker's pace, reconnecting when it must.
        cli_out = tmp_path / "cli.txt"
        command = [str(BIN / "rta-client"), "stream", str(raw), "--encoding", "pcm_s16le", "--realtime"]
        command += ["--reconnect", "--uri", url, "--token", TOKEN, "-o", str(cli_out)]
        cli = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        )
        # The page, served through the proxy, with its token in the address and a fake microphone.
        find = driver.find_element  # type: ignore[attr-defined]
        driver.get(f"http://{base}/#token={TOKEN}")  # type: ignore[attr-defined]
        find(By.ID, "start").click()
        wait_for(driver, lambda d: find(By.ID, "connection").text == "live", 30)

        # A is full: not ready, and a third session is refused with 1013.
        wait_until(lambda: a.ready()[1].get("reason") == "at capacity: 2 of 2 sessions", 30, "A to be full")
        refusal, code = refusal_through(url)
        assert (refusal, code) == (
            {
                "type": "error",
                "code": "server_busy",
                "message": "the server is at its limit of 2 sessions; try again later",
            },
            1013,
        )

        # Roll out B: the next session goes to B, the replica with room, and survives a quiet 65 s (longer
        # than nginx's default proxy_read_timeout) with keepalives and pings only.
        proxy.service = [a, b]
        proxy.routes_to(["b"])
        pausing = PausingClient(url, pcm16(np.concatenate([say(SENTENCES[3]), pause])), pcm16(say(SENTENCES[0])), 65)
        pausing.start()
        wait_until(lambda: b.ready()[1].get("sessions") == 1, 30, "the new session to reach B")

        # SIGTERM to A while both clients are in mid-speech: the CLI inside its long utterance.
        def cli_in_long_utterance() -> bool:
            sizes = sorted((sent.startswith(r["pcm"]), len(r["pcm"])) for r in a.records() if len(r["pcm"]) > 32000)
            return len(sizes) == 2 and sizes[1][0] and sizes[1][1] >= cut_bytes and sizes[0][1] >= 3 * 32000

        sent = raw.read_bytes()
        wait_until(cli_in_long_utterance, 60, "the CLI to reach its long utterance on A")
        sigterm_at = time.time()
        a.process.send_signal(signal.SIGTERM)

        _, cli_stderr = cli.communicate(timeout=seconds(180))
        assert cli.returncode == 0, cli_stderr.decode()
        try:
            wait_for(driver, lambda d: plain(find(By.ID, "finals").text).startswith(expected), 120)
        except TimeoutException:
            heard = {r.name: [(m["status"], m["finals"]) for m in r.records()] for r in (a, b)}
            raise AssertionError(f"page: {find(By.ID, 'finals').text!r}; records: {heard}") from None
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "rolling-restart-page.png"))  # type: ignore[attr-defined]
        page_text = find(By.ID, "finals").text
        pausing.join(seconds(120))
        assert a.process.wait(seconds(60)) == 0
        find(By.ID, "finish").click()
        wait_for(driver, lambda d: find(By.ID, "recording").text.startswith("completed:"), 60)

    # The CLI: its transcript is every word of the speech, in order, nothing twice.
    assert plain(cli_out.read_text()) == expected, cli_out.read_text()
    assert "closed (1001 server shutting down); going on from" in cli_stderr.decode()
    assert plain(page_text).startswith(expected), page_text
    # The quiet session: both of its utterances, with pongs through the proxy during the pause.
    assert pausing.error is None and pausing.close_code == 1000, pausing.error
    assert plain(finals_text(pausing.messages)) == plain(f"{SENTENCES[3]} {SENTENCES[0]}")
    assert pausing.pongs >= 20

    # A: two sessions drained (finals kept, closed for the shutdown), one of them the CLI's.
    a_records, b_records = a.records(), b.records()
    assert sorted(r["status"] for r in a_records) == ["server_shutdown", "server_shutdown"]
    messages = [json.loads(line)["message"] for line in a.log.read_text().splitlines() if line.startswith("{")]
    assert "drained: 2 session(s) finished, 0 closed early" in messages  # finals and 1001 for both, in time
    (a_cli,) = [r for r in a_records if sent.startswith(r["pcm"])]
    (b_cli,) = [r for r in b_records if sent.endswith(r["pcm"]) and r["status"] == "completed"]
    # Every byte reached a server: A's part and B's part cover the speech. B's starts in the pause
    # before the cut utterance, before the end of A's part: the whole utterance was heard again.
    resumed_at = len(sent) - len(b_cli["pcm"])
    assert (long_start - 16000) * 2 <= resumed_at <= (long_start + 4000) * 2 < len(a_cli["pcm"]), (
        resumed_at,
        long_start,
    )
    (a_page,) = [r for r in a_records if r is not a_cli]
    b_page = [r for r in b_records if r is not b_cli and started(r) >= sigterm_at]  # the page's next session(s)
    figures = {
        "sessions_drained": len(a_records),
        "finals_before_1001": {"cli": len(a_cli["finals"]), "page": len(a_page["finals"])},
        "words_lost": {"cli": 0, "page": 0},
        "reconnect_s": {
            "cli": round(started(b_cli) - ended(a_cli), 3),
            "page": round(min(started(r) for r in b_page) - ended(a_page), 3),
        },
        "sigterm_to_last_1001_s": round(max(ended(r) for r in a_records) - sigterm_at, 3),
        "resent_s": round((len(a_cli["pcm"]) + len(b_cli["pcm"]) - len(sent)) / 32000, 3),
        "proxy_changes": [names for _, names in proxy.changes],
    }
    (ARTIFACTS / "rolling-restart.json").write_text(json.dumps(figures, indent=2) + "\n")
    assert all(0 <= v < 10 for v in figures["reconnect_s"].values()), figures
