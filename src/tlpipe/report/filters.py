"""Filter patterns: the input each filter responds to most, by gradient ascent in input space.

As in the book: start from a grey image with a little noise, repeatedly step along the gradient of
the filter's mean activation, each step's gradient normalised by its RMS. All K filters of a layer
ascend together as one batch (each image's loss only depends on its own filter), so a layer costs
`steps` forward/backward passes. Ascent runs in the model's input space (RGB 0..255, through the
model's own preprocessing), so the result is directly an image.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from tlpipe.runtime.errors import ConfigError
from tlpipe.runtime.log import progress
from tlpipe.report import graph
from tlpipe.report.plotting import save_png, upscale
from tlpipe.tiles import tile_grid

GRID_COLS = 8


AUTO_LAYERS = 4


def auto_layers(model, n: int = AUTO_LAYERS) -> list[str]:
    """visualize.filter_layers: auto: the first convolution of each block the base keeps, up to `n`
    (VGG: block1_conv1, block2_conv1, ...: the book's choice at block5_pool, three at block3_pool);
    for bases without VGG's names, `n` convolutions spread evenly from the first to the last."""
    convs = [layer.name for layer in graph.conv_layers(model)]
    firsts = [name for name in convs if name.endswith("_conv1")]
    if firsts:
        return firsts[:n]
    if len(convs) <= n:
        return convs
    return [convs[round(i * (len(convs) - 1) / (n - 1))] for i in range(n)]


def filter_patterns(model, layer_name: str, n_filters: int, steps: int = 30, size: int = 64,
                    step: float = 4.0, seed: int = 0):
    """Gradient ascent for filters 0..K-1 of `layer_name`.

    `step`: RMS change per step in grey levels; measured in the model's input space (not the
    backbone's preprocessed one) it means the same for every backbone (VGG's caffe scaling is
    ~0..255, inception's -1..1). 30 steps of 4 levels move a pixel up to ~120 levels from grey.
    Returns (patterns K x size x size x 3 float32 in input space, start K, end K): the filters'
    mean activations before and after the ascent.
    """
    layer = graph.get_base_layer(model, layer_name)
    if layer is None:
        names = ", ".join(x.name for x in graph.conv_layers(model)[:12])
        raise ConfigError(f"visualize.filter_layers: no layer {layer_name!r} in the model; "
                          f"conv layers are: {names} ...")
    fwd = graph.tap(model, [layer_name], with_output=False)
    k = min(int(n_filters), int(layer.output.shape[-1]))
    rng = np.random.default_rng(seed)
    x = tf.constant(128.0 + rng.uniform(-10.0, 10.0, (k, size, size, 3)).astype(np.float32))
    idx = tf.range(k)

    def scores(x):
        (act,), _ = fwd(x)
        act = tf.cast(act, tf.float32)
        # image i is scored on filter i: gather the i-th channel of the i-th sample's map
        per_channel = tf.reduce_mean(act, axis=(1, 2))  # K x C
        return tf.gather(per_channel, idx, axis=1, batch_dims=1)

    start = scores(x).numpy()
    for _ in progress(range(steps), desc=f"filters {layer_name}", unit="step", leave=False):
        with tf.GradientTape() as tape:
            tape.watch(x)  # the input is what we optimise; the (maybe frozen) weights are not
            total = tf.reduce_sum(scores(x))
        g = tape.gradient(total, x)
        g = g / (tf.sqrt(tf.reduce_mean(tf.square(g), axis=(1, 2, 3), keepdims=True)) + 1e-5)
        x = tf.clip_by_value(x + step * g, 0.0, 255.0)
    end = scores(x).numpy()
    return x.numpy(), start, end


def deprocess(pattern: np.ndarray) -> np.ndarray:
    """The book's display mapping: standardise, *0.1 + 0.5, clip, to uint8."""
    x = np.asarray(pattern, dtype=np.float64)
    x = (x - x.mean()) / (x.std() + 1e-5)
    return (np.clip(x * 0.1 + 0.5, 0, 1) * 255).astype(np.uint8)


def filter_grid(patterns: np.ndarray, cols: int = GRID_COLS, min_tile: int = 128) -> np.ndarray:
    tiles = np.stack([deprocess(p) for p in patterns])
    scale = max(1, -(-min_tile // tiles.shape[1]))
    return tile_grid(upscale(tiles, scale), cols, pad=2, pad_value=255)


def save_filter_grids(model, layer_names: list[str], n_filters: int, steps: int, out_dir,
                      size: int = 64, seed: int = 0, prefix: str = "filters") -> list[dict]:
    """One grid PNG per layer; records: layer, filters, gain (mean end/start activation), file."""
    records = []
    for name in layer_names:
        patterns, start, end = filter_patterns(model, name, n_filters, steps, size, seed=seed)
        file = f"{prefix}_{name}.png"
        save_png(filter_grid(patterns), Path(out_dir) / file)
        records.append({"layer": name, "filters": len(patterns), "file": file,
                        "start": float(np.mean(start)), "end": float(np.mean(end))})
    return records
