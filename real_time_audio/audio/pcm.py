"""Turning received PCM frames into the 16 kHz mono float32 audio Whisper takes."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import soxr
from numpy.typing import NDArray

MODEL_SAMPLE_RATE = 16000
SAMPLE_WIDTH = {"pcm_s16le": 2, "pcm_f32le": 4}  # bytes per sample of each PCM encoding


class BadAudioError(ValueError):
    """Audio that cannot be decoded in the session's encoding.

    `salvaged` holds samples decoded before the problem was found (container streams), which are
    still valid and must not be lost. `fatal`: the stream is hostile (it expands beyond any real
    codec, or declares an impossible format); the session ends after the audio before it.
    """

    def __init__(self, message: str, salvaged: NDArray[np.float32] | None = None, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.salvaged = salvaged if salvaged is not None else np.zeros(0, dtype=np.float32)
        self.fatal = fatal


class AudioDecoder(Protocol):
    """What a session needs from a decoder of its stream (raw PCM or a container)."""

    def check(self, frame: bytes) -> None:
        """Raise BadAudioError if `frame` can be rejected before it is persisted."""

    def decode(self, frame: bytes) -> NDArray[np.float32]:
        """The first piece of the 16 kHz mono samples that `frame` completes (`more` returns the rest).
        Raises BadAudioError (with salvaged samples)."""

    def more(self) -> NDArray[np.float32]:
        """The next piece of decoded samples; empty once the decoder needs more input (or is done)."""

    def drain(self) -> NDArray[np.float32]:
        """Samples held back by resampling, at a flush; the stream continues afterwards."""

    def finish(self) -> NDArray[np.float32]:
        """End of stream: the first piece of what is left (`more` returns the rest). Raises BadAudioError."""

    def close(self) -> None:
        """Release threads and buffers; nothing more will be decoded."""


class PcmDecoder:
    """Decodes a stream of raw little-endian PCM frames to 16 kHz mono float32.

    Stereo is averaged to mono, other rates are resampled with a streaming resampler whose state
    carries across frames, so frame boundaries leave no seams. A frame may end inside a stereo
    sample pair; the half pair waits for the next frame.
    """

    def __init__(self, encoding: str, sample_rate: int, channels: int) -> None:
        if encoding not in SAMPLE_WIDTH:
            raise ValueError(f"not a PCM encoding: {encoding}")
        self.encoding = encoding
        self.sample_rate = sample_rate
        self.channels = channels
        self._width = SAMPLE_WIDTH[encoding]
        self._dtype = np.dtype("<i2") if encoding == "pcm_s16le" else np.dtype("<f4")
        self._carry = b""
        self._resampler = (
            soxr.ResampleStream(sample_rate, MODEL_SAMPLE_RATE, 1, dtype="float32", quality="HQ")
            if sample_rate != MODEL_SAMPLE_RATE
            else None
        )

    def check(self, frame: bytes) -> None:
        """Raise BadAudioError if `frame` is not a whole number of samples."""
        if len(frame) % self._width:
            kind = "an even" if self._width == 2 else "a multiple of 4"
            raise BadAudioError(
                f"{self.encoding} frames must hold {kind} number of bytes; got {len(frame)} (frame rejected)"
            )

    def decode(self, frame: bytes) -> NDArray[np.float32]:
        """Decode one checked frame; returns the 16 kHz mono samples it completes."""
        data = self._carry + frame
        block = self._width * self.channels
        usable = len(data) - len(data) % block
        self._carry = data[usable:]
        samples = np.frombuffer(data[:usable], dtype=self._dtype).astype(np.float32)
        if self.encoding == "pcm_s16le":
            samples /= 32768.0
        if self.encoding == "pcm_f32le":  # before any arithmetic: NaN, infinities and huge values
            samples = np.clip(np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
        if self.channels == 2:
            samples = samples.reshape(-1, 2).mean(axis=1, dtype=np.float32)
        if self._resampler is None:
            return samples
        return np.asarray(self._resampler.resample_chunk(samples, last=False), dtype=np.float32)

    def drain(self) -> NDArray[np.float32]:
        """Return the samples still held inside the resampler (at a flush or the end of stream)."""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        tail = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._resampler.clear()
        return np.asarray(tail, dtype=np.float32)

    def more(self) -> NDArray[np.float32]:
        """A PCM frame decodes whole (its size is bounded by MAX_FRAME_BYTES): there is never more."""
        return np.zeros(0, dtype=np.float32)

    def finish(self) -> NDArray[np.float32]:
        """At the end of stream, what is left is what the resampler holds (a half sample pair is dropped)."""
        return self.drain()

    def close(self) -> None:
        """Nothing to release."""
