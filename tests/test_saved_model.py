"""model.saved: assembly of the full classifier, its metadata, atomic/deterministic save and checked load."""

import json
import zipfile

import keras
import numpy as np
import pytest

from tlpipe.features import backbones

from tlpipe.model import dense_head

from tlpipe.model import saved
from helpers import read_model_info
from tlpipe.runtime.errors import ModelFileError

SIZE = 32
INFO = {"class_names": ["cat", "dog"], "image_size": SIZE, "backbone": "tiny", "weights": "none",
        "weights_sha256": None, "preprocessing": "caffe"}


def tiny_base():
    """A 2-conv stand-in for a keras.applications base (same structure: Input -> conv layers)."""
    inp = keras.Input((SIZE, SIZE, 3), name="input_layer")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="c1", kernel_initializer=keras.initializers.GlorotUniform(1))(inp)
    x = keras.layers.MaxPooling2D(name="p1")(x)
    x = keras.layers.Conv2D(6, 3, activation="relu", name="c2", kernel_initializer=keras.initializers.GlorotUniform(2))(x)
    x = keras.layers.MaxPooling2D(name="p2")(x)
    return keras.Model(inp, x, name="tiny")


def images(n=6, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


def trained_like_head(dim, n_classes=2, seed=0):
    head = dense_head.build_head(dim, n_classes, units=8, dropout=0.5, seed=seed)
    # Non-default weights, so copying is visible (a fresh head would be re-initialised identically).
    rng = np.random.default_rng(seed + 10)
    head.set_weights([rng.normal(size=w.shape).astype("float32") for w in head.get_weights()])
    return head


@pytest.fixture
def model():
    base = tiny_base()
    return saved.assemble(base, "p2", "flatten", trained_like_head(6 * 6 * 6), INFO)


def test_layout_and_metadata(model):
    assert [lyr.name for lyr in model.layers] == ["image", "preprocess", "base", "pool", "head_dense",
                                                   "head_dropout", "head_out"]
    assert isinstance(model.get_layer("base"), keras.Model)
    assert not model.get_layer("base").trainable
    info = saved.model_info(model)
    assert info["class_names"] == ["cat", "dog"] and info["layer"] == "p2" and info["pooling"] == "flatten"
    assert info["trainable_from"] is None and info["tlpipe_version"]
    assert set(info) == set(saved.INFO_KEYS)


def test_truncation_at_inner_layer_and_pooling():
    base = tiny_base()
    m = saved.assemble(base, "c2", "avg", trained_like_head(6), INFO)
    assert m.get_layer("base").output.shape[1:] == (13, 13, 6)
    assert m.get_layer("pool").output.shape[1:] == (6,)
    assert saved.model_info(m)["layer"] == "c2"


def test_head_weights_copied_and_head_submodel_matches_full_model(model):
    x = images()
    feats = backbones.feature_model(tiny_base(), "p2", "flatten")(backbones.preprocess(x, "caffe")).numpy()
    sub = saved.head_submodel(model)
    np.testing.assert_allclose(sub.predict(feats, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    # The submodel shares the layers of the full model.
    assert sub.get_layer("head_out") is model.get_layer("head_out")


def test_preprocess_matches_keras_caffe_preprocessing():
    x = images(2)
    layer = saved.Preprocess("caffe", dict(INFO))
    want = keras.applications.vgg16.preprocess_input(x.copy())
    np.testing.assert_allclose(layer(x).numpy(), want, rtol=1e-5, atol=1e-3)
    tf_mode = saved.Preprocess("tf", dict(INFO))(x).numpy()
    np.testing.assert_allclose(tf_mode, x / 127.5 - 1, rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip_same_predictions(model, tmp_path):
    x = images()
    path = saved.save_model(model, tmp_path / "models" / "head.keras")
    loaded = saved.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert saved.model_info(loaded) == saved.model_info(model)
    assert read_model_info(path) == saved.model_info(model)
    assert not loaded.get_layer("base").trainable
    assert sorted(p.name for p in path.parent.iterdir()) == ["head.keras"]  # no temp files left


def test_save_is_byte_identical(model, tmp_path):
    a = saved.save_model(model, tmp_path / "a.keras").read_bytes()
    b = saved.save_model(model, tmp_path / "b.keras").read_bytes()
    assert a == b
    meta = json.loads(zipfile.ZipFile(tmp_path / "a.keras").read("metadata.json"))
    assert "@" in meta["date_saved"] and meta["date_saved"].startswith("1980")


def test_interrupted_save_leaves_old_file_untouched(model, tmp_path, monkeypatch):
    path = tmp_path / "head.keras"
    path.write_bytes(b"previous")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(saved, "_pin_zip", boom)
    with pytest.raises(KeyboardInterrupt):
        saved.save_model(model, path)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["head.keras"]


def test_set_trainable_from_unfreezes_the_tail_and_is_saved(model, tmp_path):
    saved.set_trainable_from(model, "c2")
    base = model.get_layer("base")
    assert [lyr.trainable for lyr in base.layers] == [False, False, False, True, True]
    assert saved.model_info(model)["trainable_from"] == "c2"
    loaded = saved.load_model(saved.save_model(model, tmp_path / "ft.keras"))
    assert saved.model_info(loaded)["trainable_from"] == "c2"
    assert [lyr.trainable for lyr in loaded.get_layer("base").layers][-2:] == [True, True]
    with pytest.raises(ModelFileError, match="no layer 'nope'"):
        saved.set_trainable_from(model, "nope")


def test_multiclass_model(tmp_path):
    info = {**INFO, "class_names": ["a", "b", "c"]}
    m = saved.assemble(tiny_base(), None, "max", trained_like_head(6, 3), info)
    p = m.predict(images(), verbose=0)
    assert p.shape == (6, 3)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)


def test_assemble_rejects_head_of_other_width():
    with pytest.raises(Exception, match="rerun the extract stage"):
        saved.assemble(tiny_base(), "p2", "flatten", trained_like_head(10), INFO)


def test_assemble_rejects_incomplete_metadata():
    with pytest.raises(ModelFileError, match="class_names"):
        saved.assemble(tiny_base(), "p2", "avg", trained_like_head(6), {k: v for k, v in INFO.items()
                                                                           if k != "class_names"})


def test_load_errors(tmp_path, model):
    with pytest.raises(ModelFileError, match="not found"):
        saved.load_model(tmp_path / "none.keras")
    junk = tmp_path / "junk.keras"
    junk.write_text("not a zip")
    with pytest.raises(ModelFileError, match="not a Keras"):
        saved.load_model(junk)
    plain = tmp_path / "plain.keras"
    tiny_base().save(plain)
    with pytest.raises(ModelFileError, match="without tlpipe metadata"):
        saved.load_model(plain)
    good = saved.save_model(model, tmp_path / "good.keras")
    damaged = tmp_path / "damaged.keras"
    # Keep the zip readable but corrupt the weights: the archive is rewritten with a truncated h5.
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(damaged, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            zout.writestr(item, data[: len(data) // 3] if item.filename.endswith(".h5") else data)
    with pytest.raises(ModelFileError, match="cannot be loaded"):
        saved.load_model(damaged)
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(ModelFileError):
        saved.load_model(truncated)


def test_save_refuses_non_tlpipe_model(tmp_path):
    with pytest.raises(ModelFileError, match="not a tlpipe model"):
        saved.save_model(tiny_base(), tmp_path / "x.keras")
    with pytest.raises(ModelFileError, match=".keras"):
        saved.save_model(tiny_base(), tmp_path / "x.h5")
