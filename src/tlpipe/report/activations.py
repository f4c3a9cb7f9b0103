"""Intermediate activations: every channel of the first N conv/pool layers of the base, as grids."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tlpipe.runtime.log import progress
from tlpipe.report import graph
from tlpipe.report.plotting import colorize, contrast_stretch, save_png, upscale
from tlpipe.tiles import tile_grid

GRID_COLS = 16  # the book's images_per_row
MIN_TILE = 32   # deep layers have 4-9 px maps: enlarge them so a tile is readable
MAX_TILE = 80   # first layers have 150+ px maps, shown ~50 px wide: shrink them (PNGs 4x smaller)


def layer_activations(model, images: np.ndarray, n_layers: int) -> list[tuple[str, np.ndarray]]:
    """[(layer name, N x h x w x C activations)] for the first `n_layers` conv/pool layers."""
    layers = graph.conv_pool_layers(model)[:n_layers]
    if not layers:
        raise ValueError(f"model {model.name!r} has no conv or pooling layer to show")
    fwd = graph.tap(model, [layer.name for layer in layers], with_output=False)
    taps, _ = fwd(np.asarray(images, dtype=np.float32))
    return [(layer.name, np.asarray(t, dtype=np.float32)) for layer, t in zip(layers, taps)]


def tile_scale(h: int, min_tile: int = MIN_TILE) -> int:
    return max(1, math.ceil(min_tile / max(1, h)))


def shrink(fmap: np.ndarray, max_tile: int = MAX_TILE) -> np.ndarray:
    """Average-pool an h x w x C map by the integer factor that brings it to <= max_tile px."""
    h, w, c = fmap.shape
    f = math.ceil(max(h, w) / max_tile)
    if f <= 1:
        return fmap
    return fmap[: h // f * f, : w // f * f].reshape(h // f, f, w // f, f, c).mean(axis=(1, 3))


def activation_grid(fmap: np.ndarray, cols: int = GRID_COLS, min_tile: int = MIN_TILE,
                    pad: int = 1, max_tile: int = MAX_TILE) -> np.ndarray:
    """One h x w x C feature map -> an RGB grid with one contrast-stretched tile per channel."""
    fmap = np.asarray(fmap)
    if fmap.ndim != 3:
        raise ValueError(f"expected an h x w x channels map, got shape {fmap.shape}")
    fmap = shrink(fmap, max_tile)
    tiles = np.stack([contrast_stretch(fmap[..., c]) for c in range(fmap.shape[-1])])
    tiles = colorize(upscale(tiles, tile_scale(fmap.shape[0], min_tile)))
    return tile_grid(tiles, cols, pad=pad, pad_value=255)


def save_activation_grids(model, images: np.ndarray, labels: list[str], out_dir, n_layers: int,
                          prefix: str = "act") -> list[dict]:
    """Write `<prefix>_<i>_<layer>.png` per image and layer; returns one record per PNG.

    Records: image (index), label, layer, channels, shape (h, w), file (name inside out_dir).
    """
    out_dir = Path(out_dir)
    acts = layer_activations(model, images, n_layers)
    records = []
    todo = [(i, name, a) for i in range(len(images)) for name, a in acts]
    for i, name, a in progress(todo, desc="activations", unit="grid", leave=False):
        file = f"{prefix}_{i}_{name}.png"
        save_png(activation_grid(a[i]), out_dir / file)
        records.append({"image": i, "label": labels[i], "layer": name, "channels": a.shape[-1],
                        "shape": tuple(a.shape[1:3]), "file": file})
    return records
