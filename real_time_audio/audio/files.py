"""Audio files for the clients: which protocol encoding a file is, reading it, and writing one.

Reading and writing use PyAV, whose wheel bundles FFmpeg, so no system FFmpeg is needed.
"""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
from numpy.typing import NDArray

from real_time_audio.audio.formats import SUFFIX_ENCODING, encoding_for
from real_time_audio.audio.pcm import MODEL_SAMPLE_RATE, SAMPLE_WIDTH, AudioDecoder, BadAudioError, PcmDecoder

# What `encode` writes for each container: (FFmpeg muxer, codec, sample rate, muxer options).
_WRITERS: dict[str, tuple[str, str, int | None, dict[str, str]]] = {
    "wav": ("wav", "pcm_s16le", None, {}),
    "flac": ("flac", "flac", None, {}),
    "mp3": ("mp3", "libmp3lame", None, {}),
    "ogg": ("ogg", "libopus", 48000, {}),
    "webm": ("webm", "libopus", 48000, {}),
    # Fragmented like Safari's MediaRecorder output: playable from the front as it arrives.
    "mp4": ("mp4", "aac", None, {"movflags": "frag_keyframe+empty_moov+default_base_moof", "frag_duration": "250000"}),
}
_FRAME = 960


def duration_of(path: Path) -> float:
    """The playing time of an audio file in seconds (decoded when the header does not say)."""
    try:
        with av.open(str(path)) as container:
            if container.duration:
                return float(container.duration) / av.time_base
    except av.FFmpegError as exc:
        raise ValueError(f"{path}: cannot decode: {exc}") from None
    return len(load_audio(path)) / MODEL_SAMPLE_RATE


def load_audio(
    path: Path, encoding: str | None = None, sample_rate: int = 16000, channels: int = 1
) -> NDArray[np.float32]:
    """Decode a whole file to 16 kHz mono float32 exactly as the server would (raw PCM needs its
    rate and channel count)."""
    from real_time_audio.audio.containers import ContainerDecoder

    encoding = encoding or encoding_for(path)
    decoder: AudioDecoder  # the server's own decoders, so that both hear the same samples
    if encoding in SAMPLE_WIDTH:
        decoder = PcmDecoder(encoding, sample_rate, channels)
        data = path.read_bytes()
        data = data[: len(data) - len(data) % SAMPLE_WIDTH[encoding]]
        return np.concatenate([decoder.decode(data), decoder.finish()])
    decoder = ContainerDecoder(encoding)
    pieces = []
    try:
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                pieces.append(decoder.decode(block))
                while len(piece := decoder.more()):
                    pieces.append(piece)
        pieces.append(decoder.finish())
        while len(piece := decoder.more()):
            pieces.append(piece)
    except BadAudioError as exc:
        raise ValueError(f"{path}: cannot decode: {exc}") from None
    finally:
        decoder.close()
    return np.concatenate(pieces)


def encode(samples: NDArray[np.float32], rate: int, encoding: str) -> bytes:
    """Encode mono float samples as a file of `encoding` (a container, or raw PCM)."""
    if encoding == "pcm_s16le":
        return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    if encoding == "pcm_f32le":
        return samples.astype("<f4").tobytes()
    muxer, codec, codec_rate, options = _WRITERS[encoding]
    out_rate = codec_rate or rate
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=muxer, options=options) as container:
        stream = container.add_stream(codec, rate=out_rate, layout="mono")
        assert isinstance(stream, av.AudioStream)
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=out_rate)
        pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
        for start in range(0, len(pcm) + 1, _FRAME):
            if start < len(pcm):
                frame = av.AudioFrame.from_ndarray(pcm[None, start : start + _FRAME], format="s16", layout="mono")
                frame.sample_rate = rate
                converted = resampler.resample(frame)
            else:
                converted = resampler.resample(None)
            for piece in converted:
                container.mux(stream.encode(piece))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def write_audio(path: Path, samples: NDArray[np.float32], rate: int) -> str:
    """Write `samples` to `path` in the format its suffix names; returns the encoding used."""
    encoding = SUFFIX_ENCODING.get(path.suffix.lower())
    if encoding is None:
        raise ValueError(f"{path}: cannot tell the format from the suffix; use .wav, .webm, .ogg, .mp4, .mp3 or .flac")
    path.write_bytes(encode(samples, rate, encoding))
    return encoding
