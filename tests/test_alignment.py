"""Word timing from cross-attention: the median filter, the DTW path and token start times, on
attention matrices built so that the right answer is known."""

from __future__ import annotations

import numpy as np

from real_time_audio.whisper.alignment import SECONDS_PER_FRAME, dtw, median_filter, token_start_times


def test_median_filter_matches_a_plain_window_median() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 40))
    padded = np.pad(x, [(0, 0), (3, 3)], mode="reflect")
    expected = np.array([[np.median(row[i : i + 7]) for i in range(40)] for row in padded])
    assert np.array_equal(median_filter(x), expected)
    short = rng.standard_normal((1, 3))  # shorter than half the window: left alone
    assert np.array_equal(median_filter(short), short)


def test_dtw_follows_the_cheap_cells() -> None:
    """Three tokens over nine frames, each cheap on its own third: the path walks the thirds in order."""
    cost = np.ones((3, 9))
    for token in range(3):
        cost[token, 3 * token : 3 * token + 3] = 0.0
    tokens, frames = dtw(cost)
    assert tokens.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert frames.tolist() == list(range(9))


def test_dtw_on_a_square_identity_takes_the_diagonal() -> None:
    tokens, frames = dtw(1.0 - np.eye(5))
    assert tokens.tolist() == frames.tolist() == [0, 1, 2, 3, 4]


def test_token_start_times_from_attention() -> None:
    """Token k attends to frames 10k..10k+9 (with noise in the other heads' weights): token k starts
    at frame 10k, 0.2 s apart."""
    rng = np.random.default_rng(0)
    heads, tokens, frames = 4, 5, 50
    attention = rng.uniform(0, 0.05, (heads, tokens, frames))
    for token in range(tokens):
        attention[:, token, 10 * token : 10 * token + 10] += 1.0
    starts = token_start_times(attention)
    assert np.allclose(starts, [0.0, 10 * SECONDS_PER_FRAME, 0.4, 0.6, 0.8])


def test_token_start_times_of_nothing() -> None:
    assert token_start_times(np.zeros((2, 0, 30))).tolist() == []
    assert token_start_times(np.zeros((2, 3, 0))).tolist() == [0.0, 0.0, 0.0]
