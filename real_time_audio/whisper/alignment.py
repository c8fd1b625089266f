"""Word timings from Whisper's cross-attention: dynamic time warping of tokens against audio frames.

This is the method of the original Whisper release (alignment heads, normalisation over tokens, a
median filter over time, DTW), applied to one row of a batch at a time, cut to that row's own
tokens and frames, so a clip's timings do not depend on what it was batched with. The DTW runs
one anti-diagonal at a time in numpy instead of cell by cell.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

SECONDS_PER_FRAME = 0.02  # one encoder frame
MEDIAN_WIDTH = 7


def median_filter(x: NDArray[np.float64], width: int = MEDIAN_WIDTH) -> NDArray[np.float64]:
    """Median over a sliding window along the last axis, reflecting at the edges."""
    if x.shape[-1] <= width // 2:
        return x
    pad = width // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    return np.median(sliding_window_view(padded, width, axis=-1), axis=-1)


def dtw(cost: NDArray[np.float64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Cheapest monotonic path through `cost` (tokens × frames): the token and frame index of each step."""
    rows, cols = cost.shape
    total = np.full((rows + 1, cols + 1), np.inf)
    total[0, 0] = 0.0
    trace = np.full((rows + 1, cols + 1), -1, dtype=np.int8)
    for diagonal in range(2, rows + cols + 1):  # every cell of an anti-diagonal depends only on earlier ones
        i = np.arange(max(1, diagonal - cols), min(rows, diagonal - 1) + 1)
        j = diagonal - i
        diagonal_move, down, right = total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]
        move = np.where(
            (diagonal_move < down) & (diagonal_move < right), 0, np.where((down < diagonal_move) & (down < right), 1, 2)
        )
        total[i, j] = cost[i - 1, j - 1] + np.choose(move, [diagonal_move, down, right])
        trace[i, j] = move
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j = rows, cols
    token_path: list[int] = []
    frame_path: list[int] = []
    while i > 0 or j > 0:
        token_path.append(i - 1)
        frame_path.append(j - 1)
        step = trace[i, j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    return np.array(token_path[::-1]), np.array(frame_path[::-1])


def token_start_times(attention: NDArray[np.float64]) -> NDArray[np.float64]:
    """Seconds at which each token begins, from its cross-attention (heads × tokens × frames)."""
    if attention.shape[1] == 0 or attention.shape[2] == 0:
        return np.zeros(attention.shape[1])
    std = attention.std(axis=-2, keepdims=True)
    weights = (attention - attention.mean(axis=-2, keepdims=True)) / np.where(std > 0, std, 1.0)
    matrix = median_filter(weights).mean(axis=0)
    tokens, frames = dtw(-matrix)
    jumps = np.diff(tokens, prepend=-1).astype(bool)
    return np.asarray(frames[jumps] * SECONDS_PER_FRAME, dtype=np.float64)
