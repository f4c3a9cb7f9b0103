"""backbone.layer / pooling auto: the linear probe, and extraction at the cut it chooses."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from helpers import stored_cats_and_dogs, write_split
from tlpipe.config import validate_params
from tlpipe.runtime.errors import DataError, FeatureFileError
from tlpipe.features import cut, probe
from tlpipe.features.extract import BaseSpec
from tlpipe.features.featurefile import read_features
from tlpipe.features.all_splits import extract_splits

AUTO = BaseSpec(name="vgg16", weights="none", layer="auto", pooling="auto", image_size=32)


# ---------------------------------------------------------------- the probe itself


@pytest.mark.parametrize("pooling, layer", [("flatten", keras.layers.Flatten()),
                                             ("avg", keras.layers.GlobalAveragePooling2D()),
                                             ("max", keras.layers.GlobalMaxPooling2D())])
def test_pool_gives_what_the_models_pooling_layer_gives(pooling, layer):
    raw = np.random.default_rng(0).normal(3.0, 10.0, (5, 4, 3, 7)).astype(np.float32)
    np.testing.assert_allclose(probe.pool(raw, pooling), np.asarray(layer(raw)), rtol=1e-6, atol=1e-5)


def test_the_probe_picks_the_layer_that_separates_the_classes():
    rng = np.random.default_rng(1)
    n = 120
    y = np.arange(n) % 2
    noise = {layer: rng.normal(size=(n, 2, 2, 8)).astype(np.float32) for layer in ("a", "b", "c")}
    noise["b"][:, :, :, 0] += 3.0 * y[:, None, None]  # only layer b's channel 0 carries the class
    half = n // 2
    rows = probe.run_probe([(layer, p) for layer in "abc" for p in ("flatten", "avg")],
                           lambda layer: noise[layer][:half], lambda layer: noise[layer][half:], y[:half], y[half:])
    assert [(r["layer"], r["pooling"]) for r in rows] == [(layer, p) for layer in "abc" for p in ("flatten", "avg")]
    assert probe.best(rows)["layer"] == "b"
    assert probe.best(rows)["val_accuracy"] > 0.9
    assert all(r["val_accuracy"] < 0.8 for r in rows if r["layer"] != "b")


def test_ties_go_to_the_lower_loss_then_to_the_earlier_candidate():
    rows = [{"layer": "x", "val_accuracy": 0.8, "val_loss": 0.5}, {"layer": "y", "val_accuracy": 0.9, "val_loss": 0.6},
            {"layer": "z", "val_accuracy": 0.9, "val_loss": 0.4}, {"layer": "w", "val_accuracy": 0.9, "val_loss": 0.4}]
    assert probe.best(rows)["layer"] == "z"


def test_spaced_rows_are_all_rows_or_an_even_spread():
    assert probe.spaced_rows(5, 10).tolist() == [0, 1, 2, 3, 4]
    picked = probe.spaced_rows(10_000, 4)
    assert picked.tolist() == [0, 3333, 6666, 9999]


# ---------------------------------------------------------------- config


def test_layer_and_pooling_default_to_auto_and_explicit_names_still_work():
    p = validate_params({})
    assert (p.backbone.layer, p.backbone.pooling) == ("auto", "auto")
    book = validate_params({"backbone": {"layer": "block5_pool", "pooling": "flatten"}})
    assert (book.backbone.layer, book.backbone.pooling) == ("block5_pool", "flatten")


def test_a_named_unfreeze_layer_must_lie_in_every_cut_auto_may_choose():
    assert validate_params({"finetune": {"unfreeze_from": "block3_conv1"}}).finetune.unfreeze_from == "block3_conv1"
    with pytest.raises(Exception, match=r"finetune.unfreeze_from: 'block5_conv1' lies after block3_pool.*"
                                        r"backbone.layer"):
        validate_params({"finetune": {"unfreeze_from": "block5_conv1"}})
    # with the cut named, the book's layer is fine
    validate_params({"backbone": {"layer": "block5_pool"}, "finetune": {"unfreeze_from": "block5_conv1"}})


# ---------------------------------------------------------------- extraction at the chosen cut


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    images, rows = stored_cats_and_dogs(root, per_class=8, size=40)
    cats, dogs = rows[:8], rows[8:]
    split = write_split(root, {"train": cats[:4] + dogs[:4], "validation": cats[4:6] + dogs[4:6],
                               "test": cats[6:] + dogs[6:]})
    return root, split, images


@pytest.fixture(scope="module")
def auto_run(project):
    root, split, images = project
    outs = extract_splits(split, images, root / "auto", AUTO, batch_size=4)
    return root / "auto", outs


def test_auto_probes_every_candidate_and_stores_the_winner(auto_run):
    out, files = auto_run
    chosen = cut.read_cut(out / "cut.json")
    assert chosen["chosen_by"] == "probe"
    assert [(r["layer"], r["pooling"]) for r in chosen["probe"]] == [
        (layer, p) for layer in ("block3_pool", "block4_pool", "block5_pool") for p in ("flatten", "avg", "max")]
    winner = probe.best(chosen["probe"])
    assert (chosen["layer"], chosen["pooling"]) == (winner["layer"], winner["pooling"])
    for f in files:
        feats, _, _, attrs = read_features(f)
        assert (attrs["layer"], attrs["pooling"]) == (chosen["layer"], chosen["pooling"])
        assert feats.shape[1] == winner["dim"]
    assert not list(out.glob(".*.work")), "work folders are removed once every split is assembled"


def test_features_at_the_chosen_cut_match_an_explicit_extraction(project, auto_run, tmp_path):
    root, split, images = project
    out, files = auto_run
    chosen = cut.read_cut(out / "cut.json")
    spec = BaseSpec(name="vgg16", weights="none", layer=chosen["layer"], pooling=chosen["pooling"], image_size=32)
    named = extract_splits(split, images, tmp_path / "named", spec, batch_size=4)
    assert cut.read_cut(tmp_path / "named" / "cut.json")["chosen_by"] == "params"
    for auto_file, named_file in zip(files, named):
        # flatten: the same numbers; avg/max: pooled by numpy instead of Keras, equal to rounding.
        np.testing.assert_allclose(read_features(auto_file)[0], read_features(named_file)[0], rtol=1e-5, atol=1e-5)


def test_pooling_auto_at_a_named_layer_probes_that_layer_only(project, tmp_path):
    root, split, images = project
    spec = BaseSpec(name="vgg16", weights="none", layer="block4_pool", pooling="auto", image_size=32)
    extract_splits(split, images, tmp_path / "f", spec, batch_size=4)
    chosen = cut.read_cut(tmp_path / "f" / "cut.json")
    assert [(r["layer"], r["pooling"]) for r in chosen["probe"]] == [
        ("block4_pool", "flatten"), ("block4_pool", "avg"), ("block4_pool", "max")]
    assert chosen["layer"] == "block4_pool"


def test_auto_extraction_is_deterministic(project, auto_run, tmp_path):
    root, split, images = project
    out, files = auto_run
    again = extract_splits(split, images, tmp_path / "again", AUTO, batch_size=4)
    assert [a.read_bytes() for a in again] == [f.read_bytes() for f in files]
    assert (tmp_path / "again" / "cut.json").read_bytes() == (out / "cut.json").read_bytes()


def test_the_cut_file_names_itself_when_missing_or_damaged(tmp_path):
    with pytest.raises(FeatureFileError, match=r"cut.json: not found; rerun the extract stage"):
        cut.read_cut(tmp_path / "cut.json")
    (tmp_path / "cut.json").write_text(json.dumps({"layer": 3}))
    with pytest.raises(FeatureFileError, match=r"cut.json: needs string fields layer and pooling"):
        cut.read_cut(tmp_path / "cut.json")


def test_later_stages_see_the_cut_not_the_params(tmp_path):
    cut.write_cut(tmp_path / "cut.json", "block4_pool", "avg", "probe", [])
    backbone = validate_params({}).backbone
    seen = cut.with_cut(backbone, tmp_path / "cut.json")
    assert (seen.layer, seen.pooling, seen.name, seen.image_size) == ("block4_pool", "avg", "vgg16", 150)


def test_auto_without_two_classes_in_training_is_a_clear_error(tmp_path):
    images, rows = stored_cats_and_dogs(tmp_path, per_class=3, size=40)
    split = write_split(tmp_path, {"train": rows[:3], "validation": rows[3:5], "test": rows[5:]})
    with pytest.raises(DataError, match=r"backbone.layer/pooling auto: the probe needs training images of at least "
                                        r"two classes"):
        extract_splits(split, images, tmp_path / "f", AUTO, batch_size=4)
    assert not (tmp_path / "f" / "cut.json").exists()
