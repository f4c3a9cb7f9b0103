"""Activation grids: one contrast-stretched tile per channel, for nested and flattened bases."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

keras = pytest.importorskip("keras")

from tlpipe.report import graph  # noqa: E402
from tlpipe.report.activations import (activation_grid, layer_activations,  # noqa: E402
                                    save_activation_grids, shrink, tile_scale)
from tlpipe.report.plotting import colorize, contrast_stretch  # noqa: E402
from tlpipe.tiles import grid_geometry  # noqa: E402


def small_model(nested: bool, size: int = 24) -> keras.Model:
    def stack(x):
        x = keras.layers.Conv2D(5, 3, padding="same", activation="relu", name="c1")(x)
        x = keras.layers.MaxPooling2D(name="p1")(x)
        x = keras.layers.SeparableConv2D(20, 3, padding="same", activation="relu", name="c2")(x)
        x = keras.layers.BatchNormalization(name="bn")(x)  # neither conv nor pool: not shown
        return keras.layers.AveragePooling2D(2, name="p2")(x)

    image = keras.Input((size, size, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="preprocess")(image)
    if nested:
        inner = keras.Input((size, size, 3))
        x = keras.Model(inner, stack(inner), name="base")(x)
    else:
        x = stack(x)
    x = keras.layers.Flatten(name="pool")(x)
    x = keras.layers.Dense(4, activation="relu", name="head_dense")(x)
    return keras.Model(image, keras.layers.Dense(1, activation="sigmoid", name="head_out")(x))


@pytest.mark.parametrize("nested", [True, False])
def test_first_n_conv_pool_layers_in_order(nested):
    model = small_model(nested)
    assert [x.name for x in graph.conv_pool_layers(model)] == ["c1", "p1", "c2", "p2"]
    imgs = np.random.default_rng(0).uniform(0, 255, (2, 24, 24, 3)).astype(np.float32)
    acts = layer_activations(model, imgs, 3)
    assert [(n, a.shape) for n, a in acts] == [("c1", (2, 24, 24, 5)), ("p1", (2, 12, 12, 5)),
                                               ("c2", (2, 12, 12, 20))]
    # the taps equal a direct run of the same layers
    first = keras.Model(model.inputs, model.get_layer("preprocess").output)(imgs)
    c1 = graph.get_base_layer(model, "c1")
    np.testing.assert_allclose(acts[0][1], c1(first), rtol=1e-5, atol=1e-5)


def test_grid_has_one_tile_per_channel():
    rng = np.random.default_rng(1)
    fmap = rng.normal(size=(6, 6, 20)).astype(np.float32)
    grid = activation_grid(fmap, cols=8, min_tile=12, pad=1)
    s = tile_scale(6, 12)
    assert s == 2
    rows, cols, h, w = grid_geometry(20, 12, 12, 8, 1)
    assert (rows, cols) == (3, 8) and grid.shape == (h, w, 3) == (3 * 12 + 2, 8 * 12 + 7, 3)
    for c in range(20):
        r, k = divmod(c, 8)
        tile = grid[r * 13:r * 13 + 12, k * 13:k * 13 + 12]
        expect = colorize(np.repeat(np.repeat(contrast_stretch(fmap[..., c]), 2, 0), 2, 1))
        assert np.array_equal(tile, expect), f"channel {c}"
    # the 4 unused cells of the last row are blank
    assert np.all(grid[26:, 4 * 13:] == 255)


def test_large_maps_are_shrunk_by_block_averaging():
    fmap = np.random.default_rng(4).normal(size=(150, 150, 3)).astype(np.float32)
    small = shrink(fmap, 80)
    assert small.shape == (75, 75, 3)
    np.testing.assert_allclose(small[3, 5], fmap[6:8, 10:12].mean(axis=(0, 1)), rtol=1e-5)
    grid = activation_grid(fmap, cols=16)
    assert grid.shape == (75, 3 * 75 + 2, 3)  # 3 channels in one row, 75 px tiles
    assert shrink(fmap[:80, :80], 80).shape == (80, 80, 3)


def test_contrast_stretch_is_the_books_scaling():
    x = np.array([[0.0, 1.0], [2.0, 3.0]])
    z = (x - 1.5) / np.std(x)
    np.testing.assert_array_equal(contrast_stretch(x), np.clip(z * 64 + 128, 0, 255).astype(np.uint8))
    assert np.all(contrast_stretch(np.zeros((3, 3))) == 128)  # dead channel: flat grey, no NaN


def test_save_grids_writes_one_png_per_image_and_layer(tmp_path):
    model = small_model(True)
    imgs = np.random.default_rng(2).uniform(0, 255, (2, 24, 24, 3)).astype(np.float32)
    recs = save_activation_grids(model, imgs, ["a", "b"], tmp_path, n_layers=10)
    assert [(r["image"], r["layer"]) for r in recs] == [(i, n) for i in (0, 1) for n in ["c1", "p1", "c2", "p2"]]
    for r in recs:
        png = Image.open(tmp_path / r["file"])
        rows, cols, h, w = grid_geometry(r["channels"], *(tile_scale(r["shape"][0]) * np.array(r["shape"])), 16, 1)
        assert png.size == (w, h) and png.mode == "RGB"
    again = save_activation_grids(model, imgs, ["a", "b"], tmp_path / "again", n_layers=10)
    for r, q in zip(recs, again):  # deterministic bytes
        assert (tmp_path / r["file"]).read_bytes() == (tmp_path / "again" / q["file"]).read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))
