"""PCM decoding, downmixing and resampling to 16 kHz mono."""

from __future__ import annotations

import numpy as np
import pytest

from real_time_audio.audio.pcm import BadAudioError, PcmDecoder


def test_s16le_at_16k_is_exact() -> None:
    """16 kHz mono s16le needs no resampling: samples come out scaled by 1/32768, one for one."""
    values = np.array([0, 1, -1, 32767, -32768, 1000], dtype="<i2")
    out = PcmDecoder("pcm_s16le", 16000, 1).decode(values.tobytes())
    np.testing.assert_array_equal(out, values.astype(np.float32) / 32768)


def test_f32le_stereo_is_averaged() -> None:
    """Stereo frames are downmixed by averaging the two channels."""
    stereo = np.array([[0.5, -0.5], [1.0, 0.0], [0.25, 0.75]], dtype="<f4")
    out = PcmDecoder("pcm_f32le", 16000, 2).decode(stereo.tobytes())
    np.testing.assert_allclose(out, [0.0, 0.5, 0.5])


def test_half_a_stereo_pair_waits_for_the_next_frame() -> None:
    """A frame may end between the left and right sample; nothing is lost or shifted."""
    stereo = np.array([[100, 300], [500, 700]], dtype="<i2").tobytes()
    decoder = PcmDecoder("pcm_s16le", 16000, 2)
    first, second = decoder.decode(stereo[:6]), decoder.decode(stereo[6:])
    np.testing.assert_allclose(np.concatenate([first, second]) * 32768, [200, 600])


@pytest.mark.parametrize(
    ("encoding", "size", "message"),
    [
        ("pcm_s16le", 3, "pcm_s16le frames must hold an even number of bytes; got 3"),
        ("pcm_f32le", 6, "pcm_f32le frames must hold a multiple of 4 number of bytes; got 6"),
    ],
)
def test_partial_samples_are_rejected(encoding: str, size: int, message: str) -> None:
    """A frame that is not a whole number of samples is refused before anything is decoded."""
    with pytest.raises(BadAudioError, match=message):
        PcmDecoder(encoding, 16000, 1).check(b"\0" * size)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_keeps_duration_across_frames(rate: int) -> None:
    """Any rate from 8 to 48 kHz, fed in odd-sized frames, yields 16 kHz audio of the same length."""
    seconds = 2
    tone = (np.sin(2 * np.pi * 440 * np.arange(rate * seconds) / rate) * 10000).astype("<i2").tobytes()
    decoder = PcmDecoder("pcm_s16le", rate, 1)
    pieces = [decoder.decode(tone[i : i + 1234]) for i in range(0, len(tone), 1234)]
    out = np.concatenate([*pieces, decoder.drain()])
    assert len(out) == 16000 * seconds
    # the tone survives: its dominant frequency is still 440 Hz
    spectrum = np.abs(np.fft.rfft(out[4000:20000]))
    assert abs(np.argmax(spectrum) * 16000 / 16000 - 440) <= 1


def test_float_stereo_with_nan_inf_and_huge_values_decodes_without_warnings() -> None:
    """Non-finite or out-of-range float samples are cleaned before the channels are averaged."""
    frame = np.array([np.nan, 0.5, np.inf, np.inf, -np.inf, 0.25, 3e38, 3e38], dtype="<f4").tobytes()
    decoder = PcmDecoder("pcm_f32le", 16000, 2)
    assert decoder.decode(frame).tolist() == [0.25, 1.0, -0.375, 1.0]
