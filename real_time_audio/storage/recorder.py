"""Per-session record on disk: the received audio, the finals, and the session's metadata, laid
out as `real_time_audio.storage.layout` says.

All methods block; the session calls them through `asyncio.to_thread`.

session.json names the server process that writes it (`server`: pid and host), so that after a
crash the next start can tell its abandoned records from those of live sibling workers and repair
them with `recover_interrupted`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from real_time_audio.audio.pcm import SAMPLE_WIDTH
from real_time_audio.storage.layout import METADATA, TRANSCRIPT, audio_name

logger = logging.getLogger(__name__)

_WAV_HEADER_BYTES = 44
_FORMAT_PCM = 1
_FORMAT_IEEE_FLOAT = 3


def wav_header(encoding: str, sample_rate: int, channels: int, data_bytes: int) -> bytes:
    """A canonical 44-byte RIFF/WAVE header for raw PCM data of `data_bytes` bytes."""
    bits = 8 * SAMPLE_WIDTH[encoding]
    fmt = _FORMAT_PCM if encoding == "pcm_s16le" else _FORMAT_IEEE_FLOAT
    block_align = channels * bits // 8
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<IHHIIHH", 16, fmt, channels, sample_rate, sample_rate * block_align, block_align, bits)
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class SessionRecorder:
    """Writes one session's record. The WAV header always describes the bytes already flushed.

    A failed write (a full disk) is raised once, as the OSError, and recorded as `failure`; from
    then on the audio and the transcript are no longer written (a later write could leave a gap),
    the byte count and SHA-256 still cover every frame received, and session.json is still
    updated whenever the disk allows, with a `storage_error` field.
    """

    FLUSH_INTERVAL_S = 1.0

    def __init__(self, root: Path, session_id: str, metadata: dict[str, Any]) -> None:
        self.folder = root / session_id
        self.audio_path = self.folder / audio_name("pcm_s16le")
        self.bytes_received = 0
        self.failure: OSError | None = None
        self._sha256 = hashlib.sha256()
        self._audio: BinaryIO | None = None
        self._audio_format: tuple[str, int, int] | None = None
        self._audio_started = False
        self._closed = False
        self._transcript: TextIO | None = None
        self._last_flush = time.monotonic()
        self._flushed_bytes = 0
        self._metadata: dict[str, Any] = {
            "session_id": session_id,
            "status": "active",
            "started_at": _now_iso(),
            "ended_at": None,
            **metadata,
            "server": {"pid": os.getpid(), "host": socket.gethostname()},
            "audio_file": self.audio_path.name,
            "bytes": 0,
            "sha256": self._sha256.hexdigest(),
        }
        try:
            self.folder.mkdir(parents=True, exist_ok=False)
            self._transcript = (self.folder / TRANSCRIPT).open("a", encoding="utf-8")
            self._write_metadata()
        except OSError as exc:  # the session goes on; its owner reads `failure` and tells the client
            self._fail(exc)

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    def update_metadata(self, **fields: Any) -> None:
        """Merge `fields` into session.json (used when the client's config changes)."""
        self._metadata.update(fields)
        self._write_metadata_guarded()

    def write_audio(self, frame: bytes, encoding: str, sample_rate: int, channels: int) -> None:
        """Append one received frame; the header and disk are brought up to date every second."""
        self._sha256.update(frame)
        self.bytes_received += len(frame)
        if not self._audio_started:
            self._audio_started = True
            if encoding in SAMPLE_WIDTH:
                self._audio_format = (encoding, sample_rate, channels)
            else:  # a container is kept as it came, under its own suffix
                self.audio_path = self.folder / audio_name(encoding)
                self._metadata["audio_file"] = self.audio_path.name
            if self.failure is None:
                self._guarded(self._open_audio)
        if self.failure is not None or self._audio is None:
            return
        self._guarded(self._audio.write, frame)
        if time.monotonic() - self._last_flush >= self.FLUSH_INTERVAL_S:
            self._guarded(self._flush_audio)

    def _open_audio(self) -> None:
        self._audio = self.audio_path.open("wb")
        if self._audio_format is not None:
            self._audio.write(wav_header(*self._audio_format, 0))
        self._write_metadata()  # names the audio file on disk, for recovery after a crash

    def _flush_audio(self) -> None:
        """Flush the data, then (for PCM) rewrite the header's sizes to cover exactly what is on disk."""
        self._last_flush = time.monotonic()
        if self._audio is None or self._flushed_bytes == self.bytes_received:
            return
        self._audio.flush()
        if self._audio_format is not None:
            self._audio.seek(0)
            self._audio.write(wav_header(*self._audio_format, self.bytes_received))
            self._audio.seek(0, os.SEEK_END)
            self._audio.flush()
        self._flushed_bytes = self.bytes_received

    @property
    def has_unflushed_audio(self) -> bool:
        return self.failure is None and self._flushed_bytes != self.bytes_received

    def tick(self) -> None:
        """Flush if a second has passed since the last flush (called when audio pauses)."""
        if self.failure is None and time.monotonic() - self._last_flush >= self.FLUSH_INTERVAL_S:
            self._guarded(self._flush_audio)

    def append_final(self, record: dict[str, Any]) -> None:
        """Add one final transcription to transcript.jsonl."""
        if self.failure is None and self._transcript is not None:
            transcript = self._transcript
            self._guarded(lambda: (transcript.write(json.dumps(record, ensure_ascii=False) + "\n"), transcript.flush()))

    def close(self, status: str, **fields: Any) -> None:
        """Flush and close every file and write the final session.json. Safe to call twice."""
        if self._audio is not None:
            audio = self._audio

            def finish_audio() -> None:
                self._flush_audio()
                os.fsync(audio.fileno())
                audio.close()
                self._audio = None

            self._guarded(finish_audio, raise_error=False)
        if self._transcript is not None and not self._transcript.closed:
            self._guarded(self._transcript.close, raise_error=False)
        self._metadata.update(fields)
        self._metadata.update(status=status, ended_at=_now_iso())
        self._closed = True
        self._write_metadata_guarded()

    @property
    def closed(self) -> bool:
        return self._closed

    def _guarded(self, action: Callable[..., object], *args: Any, raise_error: bool = True) -> None:
        """Run one disk operation; the first failure stops the audio and transcript and is raised."""
        try:
            action(*args)
        except OSError as exc:
            first = self.failure is None
            self._fail(exc)
            if first and raise_error:
                raise

    def _fail(self, exc: OSError) -> None:
        """Stop writing audio and text, and leave what is on disk readable (a valid WAV header)."""
        if self.failure is None:
            self.failure = exc
            self._metadata["storage_error"] = f"{exc.strerror or exc} (from byte {self.bytes_received})"
            logger.error("session %s: recording stopped: %s", self._metadata["session_id"], exc)
        if self._audio is not None:
            audio, self._audio = self._audio, None
            with contextlib.suppress(OSError):
                audio.close()  # pending buffered bytes may be lost; the header below counts what is on disk
            if self._audio_format is not None:
                with contextlib.suppress(OSError):
                    _repair_wav(self.audio_path, *self._audio_format, update=lambda _: None)
        if self._transcript is not None and not self._transcript.closed:
            with contextlib.suppress(OSError):
                self._transcript.close()

    def _write_metadata_guarded(self) -> None:
        if self.failure is None:
            self._guarded(self._write_metadata)
        else:  # best effort: space may have come back
            with contextlib.suppress(OSError):
                self._write_metadata()

    def _write_metadata(self) -> None:
        self._metadata.update(bytes=self.bytes_received, sha256=self.sha256)
        content = json.dumps(self._metadata, indent=2, ensure_ascii=False).encode()
        tmp, path = self.folder / f"{METADATA}.tmp", self.folder / METADATA
        try:
            tmp.write_bytes(content)
            os.replace(tmp, path)
        except OSError:
            # A full disk has no room for a second copy, but the existing file's blocks can be
            # rewritten in place (not atomic; better than a status that stays "active").
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if self.failure is None or not path.exists():
                raise
            with path.open("r+b") as existing:
                existing.write(content)
                existing.truncate()
                existing.flush()
                os.fsync(existing.fileno())


# ---------------------------------------------------------------------------------------------
# Recovery after a crash

_HASH_CHUNK_BYTES = 1 << 20


def recover_interrupted(root: Path) -> list[str]:
    """Repair the records of sessions whose server process died while they were active.

    A record qualifies when its session.json says "active" and names a process on this host that
    no longer exists. Records of other hosts and of live processes (sibling workers sharing the
    folder) are left alone, as are records that name no process. For each one: a PCM `audio.wav`
    is cut to its whole sample frames and its header rewritten to cover exactly them; `bytes` and
    `sha256` are recomputed from the audio on disk; the status becomes "interrupted" and
    `ended_at` the time the session last wrote to disk. Returns the repaired session ids.
    """
    if not root.is_dir():
        return []
    host = socket.gethostname()
    recovered: list[str] = []
    for meta_path in sorted(root.glob(f"*/{METADATA}")):
        try:
            metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.warning("cannot read %s: %s", meta_path, exc)
            continue
        if not isinstance(metadata, dict) or metadata.get("status") != "active":
            continue
        server = metadata.get("server")
        if not isinstance(server, dict) or server.get("host") != host:
            continue
        pid = server.get("pid")
        if not isinstance(pid, int) or _process_alive(pid):
            continue
        try:
            _repair(meta_path.parent, metadata)
        except (OSError, ValueError) as exc:
            logger.warning("cannot repair the record in %s: %s", meta_path.parent, exc)
            continue
        recovered.append(meta_path.parent.name)
    return recovered


def _process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (a zombie counts as dead)."""
    if pid <= 0:  # 0 and negative ids would address process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    try:  # a killed process its parent has not reaped yet still answers signal 0
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _repair(folder: Path, metadata: dict[str, Any]) -> None:
    config: dict[str, Any] = metadata["config"] if isinstance(metadata.get("config"), dict) else {}
    encoding = str(config.get("encoding", "pcm_s16le"))
    audio_path: Path | None = folder / audio_name(encoding)
    if audio_path is not None and not audio_path.exists():  # no audio yet, or a name we did not expect
        candidates = sorted(folder.glob("audio.*"))
        audio_path = candidates[0] if len(candidates) == 1 else None
    written = [p for p in (audio_path, folder / TRANSCRIPT) if p is not None and p.exists()]
    last_write = max((p.stat().st_mtime for p in written), default=(folder / METADATA).stat().st_mtime)

    digest = hashlib.sha256()
    data_bytes = 0
    seconds = 0.0
    if audio_path is not None:
        if encoding in SAMPLE_WIDTH and audio_path.suffix == ".wav":
            rate = int(config.get("sample_rate", 16000))
            channels = int(config.get("channels", 1))
            data_bytes = _repair_wav(audio_path, encoding, rate, channels, digest.update)
            seconds = data_bytes / (rate * channels * SAMPLE_WIDTH[encoding])
        else:  # a container stream is kept as it came: every byte on disk is audio
            data_bytes = _hash_file(audio_path, 0, None, digest.update)
    metadata.update(
        status="interrupted",
        ended_at=datetime.fromtimestamp(last_write, UTC).isoformat(timespec="milliseconds"),
        audio_file=audio_path.name if audio_path is not None else metadata.get("audio_file"),
        bytes=data_bytes,
        sha256=digest.hexdigest(),
        segments=_count_lines(folder / TRANSCRIPT),
        recovered_at=_now_iso(),
    )
    if encoding in SAMPLE_WIDTH:
        metadata["duration"] = round(seconds, 3)
    # A name of our own: sibling workers starting at the same moment may repair the same record.
    tmp = folder / f"{METADATA}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(metadata, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, folder / METADATA)


def _repair_wav(path: Path, encoding: str, sample_rate: int, channels: int, update: Callable[[bytes], object]) -> int:
    """Cut a PCM WAV to whole sample frames and make its header cover them; returns the data bytes."""
    block = SAMPLE_WIDTH[encoding] * channels
    with path.open("r+b") as wav:
        size = os.fstat(wav.fileno()).st_size
        data_bytes = max(0, size - _WAV_HEADER_BYTES)
        data_bytes -= data_bytes % block
        wav.truncate(_WAV_HEADER_BYTES + data_bytes)
        wav.seek(0)
        wav.write(wav_header(encoding, sample_rate, channels, data_bytes))
        wav.flush()
        os.fsync(wav.fileno())
    _hash_file(path, _WAV_HEADER_BYTES, data_bytes, update)
    return data_bytes


def _hash_file(path: Path, offset: int, length: int | None, update: Callable[[bytes], object]) -> int:
    """Pass `length` bytes (None: all) of `path` from `offset` to `update`; returns the count."""
    count = 0
    with path.open("rb") as source:
        source.seek(offset)
        while length is None or count < length:
            want = _HASH_CHUNK_BYTES if length is None else min(_HASH_CHUNK_BYTES, length - count)
            chunk = source.read(want)
            if not chunk:
                break
            update(chunk)
            count += len(chunk)
    return count


def _count_lines(path: Path) -> int:
    """Complete lines of a JSONL file (a line cut off by the crash does not count)."""
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0
