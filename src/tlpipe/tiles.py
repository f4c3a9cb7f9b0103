"""The one tile grid every picture of many images uses (activations, filter patterns, Grad-CAM pairs,
the augmentation preview): numpy only, so features/ and report/ both import it."""

from __future__ import annotations

import math

import numpy as np


def grid_geometry(n: int, tile_h: int, tile_w: int, cols: int, pad: int) -> tuple[int, int, int, int]:
    """(rows, cols, height, width) of a grid of `n` tiles, `pad` pixels between tiles (no border)."""
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    return rows, cols, rows * tile_h + (rows - 1) * pad, cols * tile_w + (cols - 1) * pad


def tile_grid(tiles, cols: int, pad: int = 1, pad_value: int = 255, border: int = 0) -> np.ndarray:
    """Lay out N equally sized tiles (N x h x w [x c]) row by row, `pad` pixels between them and
    `border` around; empty cells, gaps and border stay `pad_value`."""
    tiles = np.asarray(tiles)
    n, h, w = tiles.shape[:3]
    rows, cols, height, width = grid_geometry(n, h, w, cols, pad)
    grid = np.full((height + 2 * border, width + 2 * border) + tiles.shape[3:], pad_value, dtype=tiles.dtype)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = border + r * (h + pad), border + c * (w + pad)
        grid[y:y + h, x:x + w] = tiles[i]
    return grid


def square_cols(n: int) -> int:
    """Columns of a near-square grid of n tiles."""
    return math.ceil(math.sqrt(n))
