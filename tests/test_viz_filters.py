"""Filter patterns by gradient ascent: the chosen filter's activation really goes up."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

keras = pytest.importorskip("keras")

from tlpipe.runtime.errors import ConfigError  # noqa: E402
from tlpipe.report.filters import filter_grid, filter_patterns, save_filter_grids  # noqa: E402


def conv_model(nested: bool, size: int = 32) -> keras.Model:
    keras.utils.set_random_seed(0)

    def stack(x):
        x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="block1_conv1")(x)
        x = keras.layers.MaxPooling2D(name="block1_pool")(x)
        return keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="block2_conv1")(x)

    image = keras.Input((size, size, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1, name="preprocess")(image)
    if nested:
        inner = keras.Input((size, size, 3))
        base = keras.Model(inner, stack(inner), name="base")
        base.trainable = False
        x = base(x)
    else:
        x = stack(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(image, keras.layers.Dense(1, activation="sigmoid", name="head_out")(x))


@pytest.mark.parametrize("nested", [True, False])
def test_ascent_raises_each_filters_activation(nested):
    model = conv_model(nested)
    # 48 px: smaller/larger than the model's 32 px input is fine for the conv layers
    patterns, start, end = filter_patterns(model, "block2_conv1", 4, steps=15, size=48, seed=1)
    assert patterns.shape == (4, 48, 48, 3)
    assert np.all(start > 0)  # grey + noise already excites each filter a little
    assert np.all(end > 5 * start)
    from tlpipe.report import graph
    (act,), _ = graph.tap(model, ["block2_conv1"], with_output=False)(patterns.astype(np.float32))
    means = np.asarray(act).mean(axis=(1, 2))
    # the images returned are the ones that scored `end` (not the starting noise, not another filter's)
    np.testing.assert_allclose(np.diag(means), end, rtol=1e-4)
    # the pattern is specific: filter 0's image excites filter 0 more than filter 1's image does
    assert all(means[i, i] == means[:, i].max() for i in range(4))


def test_seeded_and_deterministic():
    model = conv_model(True)
    a = filter_patterns(model, "block1_conv1", 3, steps=3, size=16, seed=7)[0]
    b = filter_patterns(model, "block1_conv1", 3, steps=3, size=16, seed=7)[0]
    c = filter_patterns(model, "block1_conv1", 3, steps=3, size=16, seed=8)[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_more_filters_than_channels_are_clamped_and_unknown_layer_is_a_config_error():
    model = conv_model(False)
    patterns, _, _ = filter_patterns(model, "block1_conv1", 50, steps=1, size=16)
    assert len(patterns) == 6
    with pytest.raises(ConfigError, match="filter_layers.*block9_conv1.*block1_conv1"):
        filter_patterns(model, "block9_conv1", 2, steps=1)


def test_grid_pngs(tmp_path):
    model = conv_model(True)
    recs = save_filter_grids(model, ["block1_conv1", "block2_conv1"], 5, 2, tmp_path, size=20, seed=0)
    assert [r["layer"] for r in recs] == ["block1_conv1", "block2_conv1"]
    for r in recs:
        img = Image.open(tmp_path / r["file"])
        # 5 tiles of 20 px enlarged x7 to >= 128 px, 5 columns (fewer tiles than 8 columns), 2 px gaps
        assert img.size == (5 * 140 + 4 * 2, 140)
        assert r["end"] > r["start"]
        # each tile shows its own filter's pattern, with contrast (not one image repeated, not flat grey)
        pixels = np.asarray(img.convert("RGB"), dtype=np.int16)
        tiles = [pixels[:, i * 142:i * 142 + 140] for i in range(5)]
        assert all(t.std() > 10 for t in tiles)
        assert all(np.abs(a - b).mean() > 5 for i, a in enumerate(tiles) for b in tiles[i + 1:])
    grid = filter_grid(np.zeros((10, 8, 8, 3), np.float32), cols=8, min_tile=8)
    assert grid.shape == (2 * 8 + 2, 8 * 8 + 7 * 2, 3)


@pytest.mark.parametrize("cut, expected", [
    ("block5_pool", ["block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1"]),  # the book's four
    ("block4_pool", ["block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1"]),
    ("block3_pool", ["block1_conv1", "block2_conv1", "block3_conv1"]),  # no block 4 to name
])
def test_auto_filter_layers_are_the_blocks_the_cut_keeps(tmp_path, cut, expected):
    from tlpipe.config import validate_params
    from tlpipe.report.filters import auto_layers
    from tlpipe.train.models import new_model

    assert validate_params({}).visualize.filter_layers == "auto"
    backbone = validate_params({"backbone": {"weights": "none", "image_size": 32, "layer": cut,
                                             "pooling": "avg"}}).backbone
    model = new_model(backbone, "float32", 4, 0.0, 0, ["a", "b"])
    layers = auto_layers(model)
    assert layers == expected
    assert save_filter_grids(model, layers[-1:], 2, 1, tmp_path, size=32)[0]["layer"] == expected[-1]


def test_auto_filter_layers_spread_over_bases_without_vgg_names():
    from tlpipe.report.filters import auto_layers

    model = conv_model(nested=True)  # block1_conv1, block2_conv1: VGG-like names, both kept
    assert auto_layers(model) == ["block1_conv1", "block2_conv1"]
    image = keras.Input((32, 32, 3))
    x = image
    for i in range(7):
        x = keras.layers.Conv2D(4, 3, padding="same", name=f"c{i}")(x)
    plain = keras.Model(image, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(x)))
    assert auto_layers(plain) == ["c0", "c2", "c4", "c6"]
