"""Streaming container decoding: every protocol container, cut anywhere, with broken input."""

from __future__ import annotations

import random

import numpy as np
import pytest
from numpy.typing import NDArray

from real_time_audio.audio.containers import (
    EXPANSION_SLACK_S,
    MAX_EXPANSION,
    OPEN_LIMIT_BYTES,
    PIECE_SAMPLES,
    ContainerDecoder,
    WavFormat,
    mp4_index_first,
    parse_wav_header,
)
from real_time_audio.audio.files import encode
from real_time_audio.audio.formats import check_magic
from real_time_audio.audio.pcm import BadAudioError
from tests import hostile_media
from tests.conftest import speech_like

CONTAINERS = ["webm", "ogg", "mp4", "mp3", "flac", "wav"]
# Encoder padding and priming add a little audio at the ends of the lossy formats.
EXTRA_SAMPLES = {"webm": 0, "ogg": 0, "mp4": 2048, "mp3": 1152, "flac": 0, "wav": 0}
JUNK = np.random.default_rng(7).integers(0, 256, 1_300_000, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def signal() -> NDArray[np.float32]:
    return speech_like(seed=3, duration_s=6.0)


@pytest.fixture(scope="module")
def files(signal: NDArray[np.float32]) -> dict[str, bytes]:
    return {encoding: encode(signal, 16000, encoding) for encoding in CONTAINERS}


def random_slices(data: bytes, seed: int, largest: int = 6000) -> list[bytes]:
    rng = random.Random(seed)
    cuts, position = [], 0
    while position < len(data):
        size = rng.randint(1, largest)
        cuts.append(data[position : position + size])
        position += size
    return cuts


def decode_all(encoding: str, slices: list[bytes]) -> tuple[NDArray[np.float32], list[str]]:
    """Decode the slices then finish; collect every problem reported on the way (and keep salvage)."""
    decoder = ContainerDecoder(encoding)
    pieces, problems = [], []
    for piece in slices:
        try:
            pieces.append(decoder.decode(piece))
            while len(more := decoder.more()):
                pieces.append(more)
        except BadAudioError as exc:
            pieces.append(exc.salvaged)
            problems.append(str(exc))
    try:
        pieces.append(decoder.finish())
        while len(more := decoder.more()):
            pieces.append(more)
    except BadAudioError as exc:
        pieces.append(exc.salvaged)
        problems.append(str(exc))
    decoder.close()
    return np.concatenate(pieces), problems


def best_correlation(reference: NDArray[np.float32], decoded: NDArray[np.float32], max_lag: int = 2048) -> float:
    """Correlation of the decoded audio with the reference at the best small delay (codec priming)."""
    middle = reference[4000:-4000]
    return max(
        float(np.corrcoef(middle, decoded[4000 + lag : 4000 + lag + len(middle)])[0, 1])
        for lag in range(0, max_lag, 16)
    )


@pytest.mark.parametrize("encoding", CONTAINERS)
def test_every_container_decodes_the_same_however_it_is_cut(
    encoding: str, files: dict[str, bytes], signal: NDArray[np.float32]
) -> None:
    data = files[encoding]
    whole, problems = decode_all(encoding, [data])
    assert problems == []
    assert len(signal) <= len(whole) <= len(signal) + EXTRA_SAMPLES[encoding]
    assert best_correlation(signal, whole) > (0.999 if encoding in ("wav", "flac") else 0.8)
    for seed in (1, 2, 3):
        sliced, problems = decode_all(encoding, random_slices(data, seed))
        assert problems == []
        assert np.array_equal(sliced, whole)


@pytest.mark.parametrize("encoding", ["webm", "ogg", "mp4", "mp3"])
def test_streaming_containers_give_audio_before_the_end(encoding: str, files: dict[str, bytes]) -> None:
    """Live formats are decoded as they arrive, not only once the stream ends."""
    data = files[encoding]
    decoder = ContainerDecoder(encoding)
    half = sum(len(decoder.decode(piece)) for piece in random_slices(data[: len(data) // 2], 5))
    decoder.close()
    assert half > 16000 * 1.5  # at least half of the 3 seconds sent


def test_a_plain_mp4_with_its_index_last_is_decoded_at_the_end(signal: NDArray[np.float32]) -> None:
    import io

    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:  # moov after mdat, the usual file layout
        stream = container.add_stream("aac", rate=16000, layout="mono")
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=16000)
        pcm = (signal * 32767).astype(np.int16)
        for start in range(0, len(pcm), 1024):
            frame = av.AudioFrame.from_ndarray(pcm[None, start : start + 1024], format="s16", layout="mono")
            frame.sample_rate = 16000
            for piece in resampler.resample(frame):
                container.mux(stream.encode(piece))
        container.mux(stream.encode(None))
    data = buffer.getvalue()
    assert mp4_index_first(data) is False
    decoded, problems = decode_all("mp4", random_slices(data, 9))
    assert problems == []
    assert best_correlation(signal, decoded) > 0.9


@pytest.mark.parametrize("encoding", CONTAINERS)
def test_junk_is_refused_with_the_reason_and_a_real_stream_may_follow(encoding: str, files: dict[str, bytes]) -> None:
    whole, _ = decode_all(encoding, [files[encoding]])
    decoded, problems = decode_all(encoding, [JUNK[:5000], *random_slices(files[encoding], 4)])
    assert problems == [check_magic(encoding, JUNK[:12])]
    assert problems[0] is not None and problems[0].startswith(f"the stream does not look like {encoding}")
    assert np.array_equal(decoded, whole)


@pytest.mark.parametrize("encoding", ["mp3", "mp4"])
def test_corrupt_packets_are_reported_and_the_audio_before_them_kept(encoding: str, files: dict[str, bytes]) -> None:
    data = files[encoding]
    whole, _ = decode_all(encoding, [data])
    half = len(data) // 2
    decoded, problems = decode_all(encoding, [*random_slices(data[:half], 6), JUNK[:40000]])
    assert problems and all("corrupt" in p and "skipped" in p for p in problems)
    valid, _ = decode_all(encoding, [data[:half]])
    # Everything the valid half gave is there, unchanged, before whatever the junk gave.
    assert np.array_equal(decoded[: len(valid) - 2048], valid[: len(valid) - 2048])
    assert len(valid) > len(whole) // 3


def test_a_stream_that_never_finds_audio_is_given_up(files: dict[str, bytes]) -> None:
    """A FLAC signature followed by junk: the demuxer keeps reading what it takes for metadata, so
    after the open limit the stream is declared undecodable rather than swallowing bytes for ever."""
    data = b"fLaC" + JUNK[: OPEN_LIMIT_BYTES + 100_000]
    _, problems = decode_all("flac", random_slices(data, 8, largest=64_000))
    assert problems[0] == f"no playable flac audio found in the first {OPEN_LIMIT_BYTES} bytes"


def test_a_stream_ending_inside_its_header_is_reported() -> None:
    _, problems = decode_all("webm", [b"\x1a\x45\xdf"])
    assert problems == ["the stream ended after 3 bytes, before any audio: it is too short"]


def test_mp4_box_order_detection() -> None:
    ftyp = (20).to_bytes(4, "big") + b"ftypisom" + bytes(8)
    assert mp4_index_first(ftyp + (8).to_bytes(4, "big") + b"moov") is True
    assert mp4_index_first(ftyp + (8).to_bytes(4, "big") + b"mdat") is False
    assert mp4_index_first(ftyp) is None


@pytest.mark.parametrize(("subtype", "exact"), [("PCM_16", False), ("FLOAT", True), ("PCM_24", False)])
def test_wav_of_any_sample_format_streams_from_its_first_bytes(
    subtype: str, exact: bool, signal: NDArray[np.float32], tmp_path: object
) -> None:
    """16-bit and float WAV skip FFmpeg (whose WAV reader holds back 64 KiB); 24-bit goes through it."""
    import io

    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, signal, 16000, subtype=subtype, format="WAV")
    data = buffer.getvalue()
    decoder = ContainerDecoder("wav")
    early = sum(len(decoder.decode(piece)) for piece in random_slices(data[:16000], 2, largest=2000))
    decoder.close()
    if subtype != "PCM_24":
        assert early > 3000  # most of the first 16 kB is already audio
    decoded, problems = decode_all("wav", random_slices(data, 3))
    assert problems == []
    assert len(decoded) == len(signal)
    tolerance = 1e-6 if exact else 1e-4
    assert np.max(np.abs(decoded - signal)) < tolerance


def test_wav_header_parsing() -> None:
    import struct

    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 2, 44100, 44100 * 4, 4, 16)
    head = b"RIFF" + bytes(4) + b"WAVE" + fmt + b"LIST" + (3).to_bytes(4, "little") + b"abc\x00"
    assert parse_wav_header(head) is None  # no data chunk yet
    wav = parse_wav_header(head + b"data" + (0xFFFFFFFF).to_bytes(4, "little"))
    assert wav == WavFormat("pcm_s16le", 44100, 2, len(head) + 8, None)
    eight_bit = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, 8000, 8000, 1, 8)
    assert parse_wav_header(b"RIFF" + bytes(4) + b"WAVE" + eight_bit + b"data" + bytes(4)) is False


# -- hostile streams -------------------------------------------------------------------------------


def decode_fed(
    decoder: ContainerDecoder, data: bytes, slice_bytes: int = 1024
) -> tuple[list[int], BadAudioError | None]:
    """Feed `data` in slices, taking every piece; the sizes of the pieces and the error that ended it."""
    pieces: list[int] = []
    try:
        for offset in range(0, len(data), slice_bytes):
            pieces.append(len(decoder.decode(data[offset : offset + slice_bytes])))
            while len(piece := decoder.more()):
                pieces.append(len(piece))
        pieces.append(len(decoder.finish()))
        while len(piece := decoder.more()):
            pieces.append(len(piece))
    except BadAudioError as exc:
        pieces.append(len(exc.salvaged))
        return pieces, exc
    finally:
        decoder.close()
    return pieces, None


BOMBS = hostile_media.BOMBS


@pytest.mark.parametrize("encoding", sorted(BOMBS))
def test_a_decompression_bomb_is_cut_off_within_its_budget(encoding: str) -> None:
    """The stream ends with a fatal error once it has decoded more than the slack plus 1000 bytes of
    16 kHz 16-bit audio per byte received; no piece handed over is larger than a piece plus one frame."""
    data = BOMBS[encoding]()
    decoder = ContainerDecoder(encoding)
    pieces, error = decode_fed(decoder, data)
    assert error is not None and error.fatal
    assert "decodes to more audio than any real codec produces" in str(error)
    budget = EXPANSION_SLACK_S * 16000 + decoder.bytes_in * MAX_EXPANSION // 2
    largest_frame = 2 * 65535  # one FLAC frame at 8 kHz, resampled to 16 kHz
    assert sum(pieces) <= budget + largest_frame
    assert max(pieces) <= PIECE_SAMPLES + largest_frame
    assert decoder.bytes_in < len(data)  # it stopped before the end of the stream
    assert decoder.decode(data[:1024]).size == 0  # and decodes nothing more


def test_a_wav_declaring_1_hz_is_refused_before_any_audio() -> None:
    """544 bytes of µ-law at 1 Hz would be 500 s at 16 kHz; the rate is refused first."""
    decoder = ContainerDecoder("wav")
    pieces, error = decode_fed(decoder, hostile_media.mulaw_wav(500))
    assert error is not None and error.fatal and sum(pieces) == 0
    assert str(error) == "the wav stream's audio is 1 Hz with 1 channel(s); accepted are 8000-48000 Hz and 1-2 channels"


def test_a_plain_wav_header_with_an_impossible_rate_is_refused() -> None:
    header = bytearray(encode(np.zeros(1600, dtype=np.float32), 16000, "wav"))
    header[24:28] = (400000).to_bytes(4, "little")
    decoder = ContainerDecoder("wav")
    pieces, error = decode_fed(decoder, bytes(header))
    assert error is not None and error.fatal and sum(pieces) == 0
    assert "400000 Hz" in str(error)


def test_the_sample_rate_limit_is_a_setting() -> None:
    """96 kHz is refused by default and accepted when MAX_SAMPLE_RATE allows it."""
    data = encode(speech_like(seed=1, duration_s=6.0), 96000, "flac")  # 96,000 samples: 1 s at 96 kHz
    assert decode_fed(ContainerDecoder("flac"), data)[1] is not None
    pieces, error = decode_fed(ContainerDecoder("flac", max_sample_rate=96000), data)
    assert error is None and sum(pieces) == pytest.approx(16000, abs=200)


@pytest.mark.parametrize("encoding", ["flac", "ogg", "webm", "mp3"])
def test_real_digital_silence_is_not_mistaken_for_a_bomb(encoding: str) -> None:
    """A minute of digital silence, the most compressible real stream, decodes whole."""
    data = encode(np.zeros(60 * 16000, dtype=np.float32), 16000, encoding)
    pieces, error = decode_fed(ContainerDecoder(encoding), data)
    assert error is None
    assert 60 * 16000 <= sum(pieces) <= 60 * 16000 + EXTRA_SAMPLES[encoding] + 1152


def test_a_long_stream_in_one_slice_comes_out_in_bounded_pieces(signal: NDArray[np.float32]) -> None:
    """Ten times the signal sent at once: pieces of about PIECE_SAMPLES, and all of the audio."""
    data = encode(np.tile(signal, 10), 16000, "flac")
    pieces, error = decode_fed(ContainerDecoder("flac"), data, slice_bytes=len(data))
    assert error is None and sum(pieces) == 10 * len(signal)
    assert len(pieces) >= 10 * len(signal) // PIECE_SAMPLES and max(pieces) <= PIECE_SAMPLES + 4608
