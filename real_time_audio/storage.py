"""Per-session record on disk: the received audio, the finals, and the session's metadata.

Layout under the storage folder, one folder per server-generated session id:
    audio.wav          raw PCM exactly as received, behind a WAV header kept valid as it grows, or
    audio.<container>  a container stream (webm, ogg, mp4, mp3, flac, wav) byte for byte as received
    transcript.jsonl   one JSON line per final transcription
    session.json       effective config, model, device, times, byte count, SHA-256, status

All methods block; the session calls them through `asyncio.to_thread`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from real_time_audio.audio import SAMPLE_WIDTH

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
    """Writes one session's record. The WAV header always describes the bytes already flushed."""

    FLUSH_INTERVAL_S = 1.0

    def __init__(self, root: Path, session_id: str, metadata: dict[str, Any]) -> None:
        self.folder = root / session_id
        self.folder.mkdir(parents=True, exist_ok=False)
        self.audio_path = self.folder / "audio.wav"
        self.bytes_received = 0
        self._sha256 = hashlib.sha256()
        self._audio: BinaryIO | None = None
        self._audio_format: tuple[str, int, int] | None = None
        self._transcript = (self.folder / "transcript.jsonl").open("a", encoding="utf-8")
        self._last_flush = time.monotonic()
        self._flushed_bytes = 0
        self._metadata: dict[str, Any] = {
            "session_id": session_id,
            "status": "active",
            "started_at": _now_iso(),
            "ended_at": None,
            **metadata,
            "audio_file": self.audio_path.name,
            "bytes": 0,
            "sha256": self._sha256.hexdigest(),
        }
        self._write_metadata()

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    def update_metadata(self, **fields: Any) -> None:
        """Merge `fields` into session.json (used when the client's config changes)."""
        self._metadata.update(fields)
        self._write_metadata()

    def write_audio(self, frame: bytes, encoding: str, sample_rate: int, channels: int) -> None:
        """Append one received frame; the header and disk are brought up to date every second."""
        if self._audio is None:
            if encoding in SAMPLE_WIDTH:
                self._audio_format = (encoding, sample_rate, channels)
            else:  # a container is kept as it came, under its own suffix
                self.audio_path = self.folder / f"audio.{encoding}"
                self._metadata["audio_file"] = self.audio_path.name
            self._audio = self.audio_path.open("wb")
            if self._audio_format is not None:
                self._audio.write(wav_header(encoding, sample_rate, channels, 0))
        self._audio.write(frame)
        self._sha256.update(frame)
        self.bytes_received += len(frame)
        if time.monotonic() - self._last_flush >= self.FLUSH_INTERVAL_S:
            self._flush_audio()

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
        return self._flushed_bytes != self.bytes_received

    def tick(self) -> None:
        """Flush if a second has passed since the last flush (called when audio pauses)."""
        if time.monotonic() - self._last_flush >= self.FLUSH_INTERVAL_S:
            self._flush_audio()

    def append_final(self, record: dict[str, Any]) -> None:
        """Add one final transcription to transcript.jsonl."""
        self._transcript.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._transcript.flush()

    def close(self, status: str, **fields: Any) -> None:
        """Flush and close every file and write the final session.json. Safe to call twice."""
        if self._audio is not None:
            self._flush_audio()
            os.fsync(self._audio.fileno())
            self._audio.close()
            self._audio = None
        if not self._transcript.closed:
            self._transcript.close()
        self._metadata.update(fields)
        self._metadata.update(status=status, ended_at=_now_iso(), bytes=self.bytes_received, sha256=self.sha256)
        self._write_metadata()

    @property
    def closed(self) -> bool:
        return self._audio is None and self._transcript.closed

    def _write_metadata(self) -> None:
        self._metadata.update(bytes=self.bytes_received, sha256=self.sha256)
        tmp = self.folder / "session.json.tmp"
        tmp.write_text(json.dumps(self._metadata, indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, self.folder / "session.json")
