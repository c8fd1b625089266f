"""What the benchmarks share: the server as its own process, its memory and metrics, the machine."""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent


def replace_docs_block(docs: Path, begin: str, end: str, body: str) -> None:
    """Put `body` between the `begin` and `end` markers of a docs page (the block is added at the
    end of the page the first time)."""
    block = f"{begin}\n{body}\n{end}"
    text = docs.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + f"\n\n{block}\n"
    docs.write_text(text, encoding="utf-8")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS), in MiB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def wait_ready(port: int, process: subprocess.Popen[bytes], timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            sys.exit(f"server exited with {process.returncode}")
        if time.monotonic() > deadline:
            sys.exit(f"server not ready after {timeout_s:.0f} s")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2):
                return
        except OSError:
            time.sleep(0.5)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {"name" or "name{label=value,...}": value}."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return values


class ServerProcess:
    """`uvicorn main:app` in its own process on a free port, with its own storage folder."""

    def __init__(self, checkpoint: Path, device: str, env: dict[str, str] | None = None, project: Path = ROOT) -> None:
        self.project = project  # the checkout whose server runs
        self.port = free_port()
        self.storage = Path(tempfile.mkdtemp(prefix="rta-bench-"))
        self.env = {
            **os.environ,
            "TRANSCRIPTION_MODEL_ID": str(checkpoint),
            "DEVICE": device,
            "AUDIO_STORAGE_DIR": str(self.storage),
            "HF_HUB_OFFLINE": "1",
            "LOG_LEVEL": "WARNING",
            # Every client of a load test comes from 127.0.0.1, unauthenticated, for as long as it takes.
            "API_TOKENS": "",
            "ALLOWED_ORIGINS": "",
            "MAX_CONNECTIONS_PER_CLIENT": "0",
            "MAX_SESSION_S": "0",
            "PYTHONPATH": str(project),
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/transcribe"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> ServerProcess:
        command = [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--log-level", "warning"]
        self.process = subprocess.Popen(command, cwd=self.project, env=self.env)
        wait_ready(self.port, self.process)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.storage, ignore_errors=True)

    def rss_mib(self) -> float:
        return rss_mib(self.pid)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as response:
            return parse_metrics(response.read().decode())

    def wait_idle(self, timeout_s: float = 300) -> None:
        """Until no session is open and no job waits (the previous load has fully drained)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            values = self.metrics()
            queued = values.get("rta_queue_depth{kind=final}", 0) + values.get("rta_queue_depth{kind=partial}", 0)
            if values.get("rta_active_sessions", 0) == 0 and queued == 0:
                return
            time.sleep(0.5)


def machine() -> dict[str, str | int | float]:
    """The machine the figures come from."""
    import torch

    info: dict[str, str | int | float] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
