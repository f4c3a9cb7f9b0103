"""Deterministic PNG writing and image grids shared by the visualisations.

PNGs are encoded in memory and written to a temp name in the target folder, then renamed, so an
interrupted run never leaves a file that looks finished; metadata that would vary (matplotlib's
version stamp) is stripped so the same pixels give byte-identical files.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # never a display: stages run headless

import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from tlpipe import atomic  # noqa: E402


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an HxW or HxWx3 uint8 array as PNG (Pillow's encoder is deterministic)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"png_bytes expects uint8 pixels, got {image.dtype}")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def save_png(image: np.ndarray, path) -> Path:
    return atomic.write_bytes(path, png_bytes(image))


def new_figure(width_in: float, height_in: float) -> Figure:
    """A matplotlib Figure not registered with pyplot (no global state to leak between plots)."""
    fig = Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path) -> Path:
    buf = io.BytesIO()
    # Software/Creation metadata carry the matplotlib version: drop them for reproducible bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return atomic.write_bytes(path, buf.getvalue())


def contrast_stretch(channel: np.ndarray) -> np.ndarray:
    """The book's display scaling of one feature map: standardise, *64+128, clip to uint8."""
    x = np.asarray(channel, dtype=np.float64)
    x = x - x.mean()
    x = x / (x.std() + 1e-5)
    return np.clip(x * 64.0 + 128.0, 0, 255).astype(np.uint8)


def grid_geometry(n: int, tile_h: int, tile_w: int, cols: int, pad: int) -> tuple[int, int, int, int]:
    """(rows, cols, height, width) of a grid of `n` tiles, `pad` pixels between tiles."""
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    return rows, cols, rows * tile_h + (rows - 1) * pad, cols * tile_w + (cols - 1) * pad


def tile_grid(tiles, cols: int, pad: int = 1, pad_value: int = 255) -> np.ndarray:
    """Lay out N equally sized tiles (N x h x w [x c]) row by row; empty cells stay `pad_value`."""
    tiles = np.asarray(tiles)
    n, h, w = tiles.shape[:3]
    rows, cols, height, width = grid_geometry(n, h, w, cols, pad)
    grid = np.full((height, width) + tiles.shape[3:], pad_value, dtype=tiles.dtype)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = r * (h + pad), c * (w + pad)
        grid[y:y + h, x:x + w] = tiles[i]
    return grid


def upscale(tiles: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement of N x h x w [x c] tiles so tiny maps stay visible."""
    if factor <= 1:
        return tiles
    return np.repeat(np.repeat(tiles, factor, axis=1), factor, axis=2)


def colorize(gray: np.ndarray, cmap: str = "viridis") -> np.ndarray:
    """uint8 grey levels -> uint8 RGB through a matplotlib colour map."""
    lut = (colormaps[cmap](np.arange(256))[:, :3] * 255.0 + 0.5).astype(np.uint8)
    return lut[np.asarray(gray, dtype=np.uint8)]
