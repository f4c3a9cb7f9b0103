"""Deterministic PNG writing and the pixel helpers shared by the visualisations (grids: tlpipe.tiles).

PNGs are encoded in memory and written to a temp name in the target folder, then renamed, so an
interrupted run never leaves a file that looks finished; metadata that would vary (matplotlib's
version stamp) is stripped so the same pixels give byte-identical files.
"""
from __future__ import annotations

import io
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


def upscale(tiles: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement of N x h x w [x c] tiles so tiny maps stay visible."""
    if factor <= 1:
        return tiles
    return np.repeat(np.repeat(tiles, factor, axis=1), factor, axis=2)


def colorize(gray: np.ndarray, cmap: str = "viridis") -> np.ndarray:
    """uint8 grey levels -> uint8 RGB through a matplotlib colour map."""
    lut = (colormaps[cmap](np.arange(256))[:, :3] * 255.0 + 0.5).astype(np.uint8)
    return lut[np.asarray(gray, dtype=np.uint8)]
