"""Streaming decoding of container audio (WebM, Ogg, MP4, MP3, FLAC, WAV) with PyAV.

A browser's MediaRecorder hands over its stream in slices cut anywhere, so each session keeps one
demuxer open for its whole life. FFmpeg reads through a blocking file object; the demuxer runs in
its own thread and blocks there until more bytes arrive. `decode` feeds a slice, waits until the
demuxer has used everything it can (it is blocked waiting for more, or finished) and returns the
samples that slice completed, so the caller sees the same results however the bytes were cut.

A hostile stream cannot make the decoder expand without bound:
- decoded audio leaves in pieces of at most `PIECE_SAMPLES`: the demuxer thread stops while a
  piece waits to be taken, so the caller applies its back-pressure and limits between pieces
  (`decode` and `finish` return the first piece, `more` the next ones);
- a stream that decodes to more than `EXPANSION_SLACK_S` of audio plus `MAX_EXPANSION` bytes of
  16 kHz 16-bit mono PCM per byte received is cut off with a fatal BadAudioError;
- a stream whose audio is outside 8 kHz to `max_sample_rate` or has more than `max_channels`
  channels is refused (fatal) before any of it is resampled.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import av
import numpy as np
import soxr
from numpy.typing import NDArray

from real_time_audio.audio.formats import DEMUXERS, check_magic
from real_time_audio.audio.pcm import MODEL_SAMPLE_RATE, BadAudioError, PcmDecoder

logger = logging.getLogger(__name__)

# FFmpeg demuxer for each container encoding of the protocol.
# Bytes a stream may carry before its audio track is found; beyond that it is declared undecodable.
# An MP4 may hold all its media before its index (moov), so it may look further ahead.
OPEN_LIMIT_BYTES = 1 << 20
MP4_OPEN_LIMIT_BYTES = 64 << 20
_MAGIC_BYTES = 12
_MP4_SCAN_BYTES = 64 << 10  # how far to look for the first moov/mdat box before assuming a plain MP4
_WAV_SCAN_BYTES = 64 << 10  # how far to look for a WAV's data chunk before handing it to FFmpeg
_AVSEEK_SIZE = 0x10000  # FFmpeg's "how big is the file?" pseudo-whence
_STOP_TIMEOUT_S = 10.0
# Decoded audio is handed over in pieces of at most this many samples (4 s at 16 kHz).
PIECE_SAMPLES = 4 * MODEL_SAMPLE_RATE
# No real codec expands one byte into more than this many bytes of 16 kHz 16-bit mono PCM. Measured
# with FFmpeg's encoders on a minute of digital silence (the most compressible real input): Opus in
# Ogg 139, FLAC 106, Opus in WebM 69, MP3 32, µ-law 4; speech is far lower. A stream beyond it (after
# the first EXPANSION_SLACK_S of audio) is a decompression bomb.
MAX_EXPANSION = 1000
EXPANSION_SLACK_S = 10
MIN_SAMPLE_RATE = 8000
DEFAULT_MAX_SAMPLE_RATE = 48000
DEFAULT_MAX_CHANNELS = 2


def mp4_index_first(head: bytes) -> bool | None:
    """Whether an MP4's index (moov) comes before its media (mdat); None if `head` is too short to tell.

    Fragmented and "fast start" files put it first and are read front to back as they arrive; a
    plain file puts it last, and its media can only be decoded once the end has arrived.
    """
    offset = 0
    while offset + 8 <= len(head):
        size = int.from_bytes(head[offset : offset + 4], "big")
        kind = head[offset + 4 : offset + 8]
        if kind == b"moov":
            return True
        if kind in (b"mdat", b"moof"):
            return False
        if size == 1 and offset + 16 <= len(head):
            size = int.from_bytes(head[offset + 8 : offset + 16], "big")
        if size < 8:
            return False  # a box running to the end of the file, or a corrupt size
        offset += size
    return None


@dataclass(frozen=True, slots=True)
class WavFormat:
    encoding: str  # pcm_s16le or pcm_f32le
    sample_rate: int
    channels: int
    data_offset: int  # where the samples start
    data_bytes: int | None  # None: unknown (a live stream writes 0 or 0xFFFFFFFF)


def parse_wav_header(head: bytes) -> WavFormat | Literal[False] | None:
    """The sample format of a WAV file from its first bytes.

    None: the header is not complete yet. False: the samples are in a format other than 16-bit
    integer or 32-bit float PCM with one or two channels (FFmpeg decodes those).
    """
    offset, fmt = 12, None
    while offset + 8 <= len(head):
        kind, size = head[offset : offset + 4], int.from_bytes(head[offset + 4 : offset + 8], "little")
        body = offset + 8
        if kind == b"fmt ":
            if body + 16 > len(head):
                return None
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", head[body : body + 16])
            if tag == 0xFFFE and size >= 40 and body + 40 <= len(head):  # WAVE_FORMAT_EXTENSIBLE
                tag = int.from_bytes(head[body + 24 : body + 26], "little")
            fmt = {(1, 16): "pcm_s16le", (3, 32): "pcm_f32le"}.get((tag, bits))
            if fmt is None or channels not in (1, 2):
                return False
            wav_channels, wav_rate = channels, rate
        elif kind == b"data":
            if fmt is None:
                return False
            return WavFormat(fmt, wav_rate, wav_channels, body, None if size in (0, 0xFFFFFFFF) else size)
        offset = body + size + (size & 1)
    return None


class _BlockingInput:
    """The file object FFmpeg reads: `read` blocks until bytes are fed or the input is closed.

    Forward-only, except while `retain` is set: then every byte stays available, so that a demuxer
    that must look ahead (an MP4 whose index comes after its media) can seek back once it has it.
    """

    def __init__(self, retain: bool) -> None:
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._pos = 0  # stream offset of the next read
        self._cond = threading.Condition()
        self._closed = False
        self.aborted = False
        self.retain = retain
        self.starved = False  # the reader is blocked with nothing left to read

    @property
    def _available(self) -> int:
        return self._base + len(self._buf)

    def feed(self, data: bytes) -> None:
        with self._cond:
            if self.aborted:
                return
            self._buf += data
            self.starved = False
            self._cond.notify_all()

    def close_input(self) -> None:
        with self._cond:
            self._closed = True
            self.starved = False  # from now on reads return what is left, then the end
            self._cond.notify_all()

    def abort(self) -> None:
        """Make the reader see the end of the stream at once, dropping what it has not read."""
        with self._cond:
            self.aborted = self._closed = True
            self._base, self._buf, self._pos = self._pos, bytearray(), self._pos
            self._cond.notify_all()

    def release(self) -> None:
        """Stop retaining: bytes already read are dropped, and seeking back becomes impossible."""
        with self._cond:
            self.retain = False
            self._trim()

    def _trim(self) -> None:
        if not self.retain and self._pos > self._base:
            del self._buf[: self._pos - self._base]
            self._base = self._pos

    def _wait_for(self, offset: int) -> None:
        """Block until the byte at `offset` has arrived or the input is closed."""
        while offset >= self._available and not self._closed:
            self.starved = True
            self._cond.notify_all()
            self._cond.wait()
        self.starved = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.retain

    def read(self, size: int) -> bytes:
        with self._cond:
            self._wait_for(self._pos)
            start = self._pos - self._base
            data = bytes(self._buf[start : start + size])
            self._pos += len(data)
            self._trim()
            return data

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == _AVSEEK_SIZE:
            return -1  # the total size is unknown while the stream is live
        with self._cond:
            if whence == 2:
                if not self._closed:
                    return -1  # the end of a live stream is not known yet
                target = self._available + offset
            else:
                target = offset if whence == 0 else self._pos + offset
            if target < self._base:
                return -1  # released already
            self._wait_for(target - 1)
            self._pos = min(target, self._available)
            return self._pos

    def wait_starved(self, done: Callable[[], bool]) -> None:
        """Block until the reader has read everything and waits for more, or `done()` (it has
        finished, or its output is full)."""
        with self._cond:
            while not self.starved and not done():
                self._cond.wait(timeout=0.05)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class ContainerDecoder:
    """Decodes one session's container stream to 16 kHz mono float32, slice by slice.

    Errors surface as BadAudioError from `decode`/`finish`. After an error the decoder resets: the
    samples already returned stay valid, and the next slice is expected to begin a new stream.
    """

    def __init__(
        self,
        encoding: str,
        *,
        max_sample_rate: int = DEFAULT_MAX_SAMPLE_RATE,
        max_channels: int = DEFAULT_MAX_CHANNELS,
    ) -> None:
        if encoding not in DEMUXERS:
            raise ValueError(f"not a container encoding: {encoding}")
        self.encoding = encoding
        self.max_sample_rate = max_sample_rate
        self.max_channels = max_channels
        self.samples_out = 0
        self.bytes_in = 0  # every byte fed, for the expansion budget
        self._produced = 0  # samples decoded (at 16 kHz), against that budget
        self._open_limit = MP4_OPEN_LIMIT_BYTES if encoding == "mp4" else OPEN_LIMIT_BYTES
        self._life = threading.Lock()  # orders starting the demuxer against closing the decoder
        self._closed = False
        self._start()

    def _start(self) -> None:
        self._input = _BlockingInput(retain=False)
        self._head = b""
        self._out: list[NDArray[np.float32]] = []
        self._error: str | None = None  # fatal: the demuxer has stopped
        self._skipped: list[str] = []  # packets dropped; decoding went on
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # the demuxer waits here while a piece is full
        self._pending = 0  # samples in _out
        self._full = False  # a whole piece waits to be taken
        self._finishing = False  # the input is closed: `more` goes on until the demuxer is done
        self._fatal = False
        self._finished = threading.Event()
        self._opened = threading.Event()
        self._resampler: soxr.ResampleStream | None = None
        self._rate = 0
        self._thread: threading.Thread | None = None
        self._pcm: PcmDecoder | None = None  # a plain PCM WAV is decoded directly, without FFmpeg
        self._pcm_left: int | None = None  # data bytes still expected, when the header says
        self.sample_rate: int | None = None  # of the decoded stream, once known

    # -- the caller's side ----------------------------------------------------------------------

    def check(self, frame: bytes) -> None:
        """Containers are validated while decoding; every slice is accepted (and persisted) first."""

    def decode(self, frame: bytes) -> NDArray[np.float32]:
        """Feed one slice; return the 16 kHz samples it completed. Raises BadAudioError."""
        if self._closed:
            return np.zeros(0, dtype=np.float32)
        self.bytes_in += len(frame)
        if self._pcm is not None:
            return self._decode_pcm(frame)
        if self._thread is None:
            self._head += frame
            if len(self._head) < _MAGIC_BYTES:
                return np.zeros(0, dtype=np.float32)  # too little to recognise the stream yet
            problem = check_magic(self.encoding, self._head)
            if problem:
                self._start()
                raise BadAudioError(problem)
            if self.encoding == "mp4" and mp4_index_first(self._head) is None and len(self._head) < _MP4_SCAN_BYTES:
                return np.zeros(0, dtype=np.float32)  # the order of the top-level boxes is not known yet
            if self.encoding == "wav":
                wav = parse_wav_header(self._head)
                if wav is None and len(self._head) < _WAV_SCAN_BYTES:
                    return np.zeros(0, dtype=np.float32)  # the header is not complete yet
                if wav:
                    return self._start_pcm(wav)
            frame = self._launch()
        self._input.feed(frame)
        self._input.wait_starved(self._piece_ready)
        if not self._opened.is_set() and self._input.tell() > self._open_limit:
            self._input.abort()
            self._join()
            self._start()
            raise BadAudioError(
                f"no playable {self.encoding} audio found in the first {self._open_limit} bytes"
                + (" (an MP4 must have its index, the moov box, before this point)" if self.encoding == "mp4" else "")
            )
        return self._collect()

    def more(self) -> NDArray[np.float32]:
        """The next piece of decoded audio; empty once the demuxer needs more input (or is done)."""
        if self._closed or self._pcm is not None or self._thread is None:
            return np.zeros(0, dtype=np.float32)
        self._input.wait_starved(self._piece_ready)
        samples = self._collect()
        if self._finishing and self._finished.is_set() and self._thread is not None:
            with self._lock:
                done = not self._out
            if done:  # the end: what the resampler still holds comes last
                self._join()
                samples = np.concatenate([samples, self.drain()])
        return samples

    def _piece_ready(self) -> bool:
        return self._full or self._finished.is_set()

    def _check_format(self, rate: int, channels: int) -> None:
        if not MIN_SAMPLE_RATE <= rate <= self.max_sample_rate or not 1 <= channels <= self.max_channels:
            raise BadAudioError(
                f"the {self.encoding} stream's audio is {rate} Hz with {channels} channel(s); accepted are "
                f"{MIN_SAMPLE_RATE}-{self.max_sample_rate} Hz and 1-{self.max_channels} channels",
                fatal=True,
            )

    def _start_pcm(self, wav: WavFormat) -> NDArray[np.float32]:
        """FFmpeg's WAV reader holds back its first 64 KiB (it checks for S/PDIF data), two seconds of
        16 kHz speech, so plain PCM WAV streams skip it: the samples go straight to a PCM decoder."""
        try:
            self._check_format(wav.sample_rate, wav.channels)
        except BadAudioError:
            self._closed = True
            raise
        self._pcm = PcmDecoder(wav.encoding, wav.sample_rate, wav.channels)
        self._pcm_left = wav.data_bytes
        self.sample_rate = wav.sample_rate
        rest, self._head = self._head[wav.data_offset :], b""
        return self._decode_pcm(rest)

    def _decode_pcm(self, frame: bytes) -> NDArray[np.float32]:
        assert self._pcm is not None
        if self._pcm_left is not None:  # bytes after the data chunk (trailing metadata) are not audio
            frame, self._pcm_left = frame[: self._pcm_left], max(0, self._pcm_left - len(frame))
        samples = self._pcm.decode(frame)
        self.samples_out += len(samples)
        return samples

    def drain(self) -> NDArray[np.float32]:
        """Samples held inside the resampler, for a flush; the demuxer stays open."""
        if self._pcm is not None:
            tail = self._pcm.drain()
            self.samples_out += len(tail)
            return tail
        with self._lock:
            if self._resampler is None:
                return np.zeros(0, dtype=np.float32)
            tail = np.asarray(self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
            self._resampler.clear()
            self.samples_out += len(tail)
            return tail.astype(np.float32, copy=False)

    def finish(self) -> NDArray[np.float32]:
        """End of stream: decode what is left, including the decoder's own delay. Raises BadAudioError."""
        if self._pcm is not None:
            return self.drain()
        if self._thread is None:
            if not self._head:
                return np.zeros(0, dtype=np.float32)
            reason = check_magic(self.encoding, self._head) if len(self._head) >= _MAGIC_BYTES else "it is too short"
            if reason:
                size = len(self._head)
                self._start()
                raise BadAudioError(f"the stream ended after {size} bytes, before any audio: {reason}")
            self._input.feed(self._launch())
        self._input.close_input()
        self._finishing = True
        return self.more()

    def _launch(self) -> bytes:
        """Start the demuxer thread; returns the held-back head, which is the first thing to feed it."""
        if self.encoding == "mp4":  # a plain MP4 (index last) needs seeking back once its end has arrived
            self._input.retain = not mp4_index_first(self._head)
        head, self._head = self._head, b""
        with self._life:
            if self._closed:  # the session ended while this slice was on its way
                self._input.abort()
                return head
            self._thread = threading.Thread(target=self._demux, name=f"demux-{self.encoding}", daemon=True)
            self._thread.start()
        return head

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join(_STOP_TIMEOUT_S)

    def abort(self) -> None:
        """Stop decoding without waiting (safe from an event loop, and while another thread is
        inside `decode`, which then returns at once): nothing more is decoded."""
        with self._life:
            self._closed = True
            self._input.abort()
        with self._lock:
            self._room.notify_all()  # a demuxer waiting for its piece to be taken sees the abort

    def close(self) -> None:
        """Stop the demuxer thread without decoding the rest (the session is gone), and wait for it.
        Safe to call while another thread is inside `decode`: nothing new starts afterwards."""
        self.abort()
        with self._life:
            thread = self._thread
        if thread is not None:
            thread.join(_STOP_TIMEOUT_S)

    def _collect(self) -> NDArray[np.float32]:
        """Take the decoded samples; raise BadAudioError carrying them if anything went wrong."""
        with self._lock:
            samples = np.concatenate(self._out) if self._out else np.zeros(0, dtype=np.float32)
            self._out.clear()
            self._pending, self._full = 0, False
            self._room.notify_all()
            error, skipped, fatal = self._error, self._skipped, self._fatal
            self._skipped = []
        self.samples_out += len(samples)
        if error is not None and fatal:  # nothing more is decoded: the session ends after this audio
            self._closed = True
            self._input.abort()
            with self._lock:
                self._room.notify_all()
            raise BadAudioError(error, samples, fatal=True)
        if error is not None:
            self._join()
            samples = np.concatenate([samples, self.drain()])
            self._start()
            raise BadAudioError(error + "; a new stream, starting with its header, may follow", samples)
        if skipped:
            if len(skipped) > 1:
                skipped = [f"{len(skipped)} corrupt {self.encoding} packets were skipped"]
            raise BadAudioError(skipped[0], samples)
        return samples

    # -- the demuxer thread ---------------------------------------------------------------------

    def _demux(self) -> None:
        try:
            with av.open(
                self._input,
                mode="r",
                format=DEMUXERS[self.encoding],
                options={"probesize": "32", "analyzeduration": "0"},
            ) as container:
                if not container.streams.audio:
                    raise BadAudioError(f"the {self.encoding} stream has no audio track")
                stream = container.streams.audio[0]
                self._opened.set()
                self._input.release()
                mono = av.AudioResampler(format="flt", layout="mono")
                for packet in container.demux(stream):
                    try:
                        frames = packet.decode()
                    except av.InvalidDataError:
                        self._skip(packet)
                        continue
                    for frame in frames:
                        self._emit(mono, frame)
                for frame in mono.resample(None):
                    self._push(frame)
        except BadAudioError as exc:
            self._fail(str(exc), fatal=exc.fatal)
        except (av.FFmpegError, ValueError, EOFError) as exc:
            if not self._input.aborted:
                self._fail(f"could not decode the {self.encoding} stream: {_describe(exc)}")
        except Exception as exc:  # never let a broken stream kill more than its own session
            logger.exception("demuxer failed")
            self._fail(f"could not decode the {self.encoding} stream: {exc!r}")
        finally:
            self._finished.set()
            self._input.wake()

    def _emit(self, mono: av.AudioResampler, frame: Any) -> None:
        self._check_format(int(frame.sample_rate), len(frame.layout.channels))
        for out in mono.resample(frame):
            self._push(out)

    def _push(self, frame: Any) -> None:
        samples = frame.to_ndarray().reshape(-1).astype(np.float32, copy=False)
        rate = int(frame.sample_rate)
        with self._lock:
            if rate != self._rate:
                if self._resampler is not None:
                    tail = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
                    self._out.append(np.asarray(tail, dtype=np.float32))
                self._rate = rate
                self.sample_rate = rate
                self._resampler = (
                    soxr.ResampleStream(rate, MODEL_SAMPLE_RATE, 1, dtype="float32", quality="HQ")
                    if rate != MODEL_SAMPLE_RATE
                    else None
                )
            samples = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
            if self._resampler is not None:
                samples = np.asarray(self._resampler.resample_chunk(samples, last=False), dtype=np.float32)
            self._out.append(samples)
            self._pending += len(samples)
            self._produced += len(samples)
            allowed = EXPANSION_SLACK_S * MODEL_SAMPLE_RATE + self.bytes_in * MAX_EXPANSION // 2
            if self._produced > allowed:
                raise BadAudioError(
                    f"the {self.encoding} stream decodes to more audio than any real codec produces: "
                    f"{self._produced / MODEL_SAMPLE_RATE:.0f} s from {self.bytes_in} bytes (at most "
                    f"{EXPANSION_SLACK_S} s plus {MAX_EXPANSION} bytes of 16 kHz 16-bit audio per byte received)",
                    fatal=True,
                )
            while self._pending >= PIECE_SAMPLES and not self._input.aborted:
                self._full = True  # the caller takes this piece before the demuxer goes on
                self._input.wake()
                self._room.wait(timeout=0.5)

    def _skip(self, packet: Any) -> None:
        """A corrupt packet: report it, drop it, and go on with the next one."""
        at = float(packet.pts * packet.time_base) if packet.pts is not None and packet.time_base else None
        where = f" at {at:.2f} s of the stream" if at is not None else ""
        with self._lock:
            self._skipped.append(f"a corrupt {self.encoding} packet{where} was skipped")

    def _fail(self, message: str, fatal: bool = False) -> None:
        with self._lock:
            self._error = message
            self._fatal = fatal


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.replace("'<none>'", "").replace(": ''", "").strip().rstrip(":")
