"""A model file saved by an earlier tlpipe (tests/golden/make_golden.py, run at commit 4c5155b) still
loads, carries its metadata and predicts the same: the saved format and the Keras internals that
model loading, head extraction and the report's layer lookups lean on have not moved under it."""

from pathlib import Path

import numpy as np

from helpers import read_model_info
from tlpipe.model.saved import head_submodel, load_model, model_info
from tlpipe.report import graph

GOLDEN = Path(__file__).parent / "golden"


def test_golden_model_loads_and_predicts_the_same():
    model = load_model(GOLDEN / "tiny.keras")
    expected = np.load(GOLDEN / "tiny_expected.npz")
    got = model.predict(expected["images"], verbose=0)
    np.testing.assert_allclose(got, expected["probabilities"], rtol=1e-5, atol=1e-6)
    info = model_info(model)
    assert info == read_model_info(GOLDEN / "tiny.keras")
    assert info["class_names"] == ["cat", "dog"] and info["image_size"] == 32
    assert info["layer"] == "block2_pool" and info["pooling"] == "avg" and info["preprocessing"] == "tf"
    assert info["trainable_from"] == "block2_conv1"


def test_golden_model_parts_are_found():
    model = load_model(GOLDEN / "tiny.keras")
    # the head alone, on pooled features, gives the full model's output
    images = np.load(GOLDEN / "tiny_expected.npz")["images"]
    pooled = model.get_layer("pool")(model.get_layer("base")(model.get_layer("preprocess")(images)))
    np.testing.assert_allclose(head_submodel(model).predict(np.asarray(pooled), verbose=0),
                               model.predict(images, verbose=0), rtol=1e-5, atol=1e-6)
    # the report finds the base's conv layers and the last one (Grad-CAM's default)
    assert [lyr.name for lyr in graph.conv_layers(model)] == ["block1_conv1", "block2_conv1"]
    assert graph.last_conv_layer(model).name == "block2_conv1"
    trainable = {lyr.name: lyr.trainable for lyr in model.get_layer("base").layers}
    assert trainable["block1_conv1"] is False and trainable["block2_conv1"] is True
