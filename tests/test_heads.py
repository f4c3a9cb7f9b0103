"""The dense head, its compilation, and the train_head stage on hand-made feature files."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from tlpipe.runtime.errors import ConfigError, FeatureFileError
from tlpipe.model import dense_head
from tlpipe.model import saved
from helpers import read_model_info
from tlpipe.train.compile import compile_classifier
from tlpipe.train.head import check_attrs_agree, run_train_head

from helpers import FEATURE_LAYER as LAYER, FEATURE_SIZE as SIZE, REPO, HeadParams, load_stage, make_feature_project


# ---------------------------------------------------------------- build_head / compile_classifier

def test_binary_head_is_the_books():
    m = compile_classifier(dense_head.build_head(20, 2, units=8, dropout=0.3), 2, 1e-4)
    assert [lyr.name for lyr in m.layers[1:]] == list(dense_head.HEAD_LAYERS)
    assert m.get_layer("head_dense").units == 8 and m.get_layer("head_dense").activation.__name__ == "relu"
    assert m.get_layer("head_dropout").rate == pytest.approx(0.3)
    out = m.get_layer("head_out")
    assert out.units == 1 and out.activation.__name__ == "sigmoid"
    assert m.loss == "binary_crossentropy"
    assert m.optimizer.__class__.__name__ == "RMSprop"
    assert float(m.optimizer.learning_rate.numpy()) == pytest.approx(1e-4)
    p = m.predict(np.ones((3, 20), np.float32), verbose=0)
    assert p.shape == (3, 1) and ((p > 0) & (p < 1)).all()


def test_multiclass_head_uses_softmax_and_sparse_labels():
    m = compile_classifier(dense_head.build_head(10, 4, units=8), 4, 1e-3)
    assert m.get_layer("head_out").units == 4 and m.get_layer("head_out").activation.__name__ == "softmax"
    assert m.loss == "sparse_categorical_crossentropy"
    x = np.random.default_rng(0).normal(size=(16, 10)).astype("float32")
    y = np.arange(16) % 4
    hist = m.fit(x, y, epochs=1, verbose=0)
    assert set(hist.history) == {"loss", "accuracy"}
    np.testing.assert_allclose(m.predict(x, verbose=0).sum(axis=1), 1, rtol=1e-5)


def test_binary_accuracy_on_int_labels_is_thresholded():
    m = compile_classifier(dense_head.build_head(4, 2, units=4), 2, 1e-3)
    x = np.random.default_rng(1).normal(size=(10, 4)).astype("float32")
    p = m.predict(x, verbose=0)[:, 0]
    y = (np.arange(10) % 2).astype("int64")
    acc = m.evaluate(x, y, verbose=0, return_dict=True)["accuracy"]
    assert acc == pytest.approx(np.mean((p > 0.5) == y))


def test_same_seed_same_initial_weights():
    a, b = dense_head.build_head(6, 2, seed=5), dense_head.build_head(6, 2, seed=5)
    c = dense_head.build_head(6, 2, seed=6)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(a.get_weights()[0], c.get_weights()[0])


@pytest.mark.parametrize("kw, match", [({"n_classes": 1}, "2 classes"), ({"units": 0}, "units"),
                                       ({"dropout": 1.0}, "dropout"), ({"input_dim": 0}, "dimension")])
def test_bad_head_arguments(kw, match):
    args = {"input_dim": 5, "n_classes": 2, **kw}
    with pytest.raises(ConfigError, match=match):
        dense_head.build_head(**args)


def test_feature_stats_keep_a_rarely_firing_feature_from_exploding():
    rng = np.random.default_rng(0)
    n = 60
    dense = rng.gamma(2.0, 1.0, size=(n, 50))  # ReLU-like features spread over the training images
    rare = np.zeros((n, 1))
    rare[0] = 0.05  # fires, weakly, on one training image
    dead = np.zeros((n, 1))  # never fires in training
    mean, var = (np.asarray(v, np.float64) for v in dense_head.feature_stats(np.hstack([dense, rare, dead])))
    # A new image where the rare feature fires as strongly as a typical one: a z-score like the others'.
    typical = dense.mean()
    z_rare = (typical - mean[50]) / np.sqrt(var[50])
    assert abs(z_rare) < 3 * np.sqrt(1 / dense_head.VARIANCE_SHRINK)
    assert np.isfinite((typical - mean[51]) / np.sqrt(var[51]))
    # The well-spread features keep nearly their own variance.
    own = dense.var(axis=0)
    assert np.allclose(var[:50], own + dense_head.VARIANCE_SHRINK * np.hstack([own, [rare.var(), 0.0]]).mean(),
                       rtol=1e-5)
    assert np.all(var[:50] / own < 1 + 2 * dense_head.VARIANCE_SHRINK)
    # Every feature constant: unit variances.
    assert dense_head.feature_stats(np.ones((5, 3)))[1] == [1.0, 1.0, 1.0]


def test_check_attrs_agree_names_the_key():
    a = {k: 1 for k in saved.FEATURE_KEYS}
    assert check_attrs_agree({"t.h5": a, "v.h5": dict(a)}) == a
    with pytest.raises(FeatureFileError, match="v.h5 has pooling=2 but t.h5 has 1"):
        check_attrs_agree({"t.h5": a, "v.h5": {**a, "pooling": 2}})


# ---------------------------------------------------------------- the train_head stage

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_feature_project(tmp_path_factory.mktemp("proj"))


def test_run_train_head_writes_a_complete_model(project, tmp_path):
    out = tmp_path / "models" / "head.keras"
    result = run_train_head(project / "features", out, tmp_path / "metrics" / "train_head.json",
                            tmp_path / "dvclive", HeadParams)
    assert result["epochs"] == 3 and len(result["history"]) == 3
    # The metrics file: the best epoch (lowest val loss) and its val accuracy, as dvclive logged it.
    on_disk = json.loads((tmp_path / "metrics" / "train_head.json").read_text())["head"]
    best = min(result["history"], key=lambda row: row["val_loss"])
    assert on_disk == {"best_epoch": best["epoch"], "val_accuracy": pytest.approx(best["val_accuracy"], abs=1e-6),
                       "lr_used": HeadParams.lr, "epochs_used": HeadParams.epochs}
    val_acc = (tmp_path / "dvclive" / "plots" / "metrics" / "val" / "accuracy.tsv").read_text().splitlines()
    assert float(val_acc[best["epoch"]].split("\t")[1]) == pytest.approx(on_disk["val_accuracy"], abs=1e-6)
    assert sorted(p.name for p in out.parent.iterdir()) == ["head.keras"]  # checkpoints removed

    model = saved.load_model(out)
    info = saved.model_info(model)
    assert info["class_names"] == ["cat", "dog"] and info["layer"] == LAYER and info["weights"] == "none"
    assert info["trainable_from"] is None and info["preprocessing"] == "caffe"
    # The saved model on raw images == its head on the stored features: the rebuilt base is the same.
    from tlpipe.features.featurefile import read_features
    from tlpipe.features.inputs import image_dataset
    import pandas as pd

    x, _, paths, _ = read_features(project / "features" / "validation.h5")
    rows = pd.read_csv(project / "data" / "split" / "validation.csv")
    assert list(rows["path"]) == paths
    files = [str(project / "data" / "images" / f) for f in rows["file"]]
    full = np.concatenate([model.predict(b, verbose=0) for b in image_dataset(files, SIZE, 8, None)])
    np.testing.assert_allclose(full, saved.head_submodel(model).predict(x, verbose=0), rtol=1e-4, atol=1e-5)


def test_mismatched_feature_files_are_refused(project, tmp_path):
    import shutil

    feats = tmp_path / "features"
    shutil.copytree(project / "features", feats)
    with h5py.File(feats / "validation.h5", "a") as f:
        f.attrs["pooling"] = "max"
    with pytest.raises(FeatureFileError, match="pooling"):
        run_train_head(feats, tmp_path / "h.keras", tmp_path / "m.json", tmp_path / "l", HeadParams)
    assert not (tmp_path / "h.keras").exists()


def test_features_of_other_backbone_params_are_refused(project, tmp_path):
    class Backbone:
        name, weights, layer, pooling, image_size = "vgg16", "none", LAYER, "avg", 64

    with pytest.raises(FeatureFileError, match=r"train.h5: made with image_size=32 but params.yaml has "
                                               r"backbone.image_size=64; rerun the extract stage"):
        run_train_head(project / "features", tmp_path / "h.keras", tmp_path / "m.json", tmp_path / "l",
                             HeadParams, backbone=Backbone)
    Backbone.image_size, Backbone.layer = SIZE, None  # null: the backbone's default layer, block5_pool
    with pytest.raises(FeatureFileError, match="layer='block3_pool' but params.yaml has backbone.layer='block5_pool'"):
        run_train_head(project / "features", tmp_path / "h.keras", tmp_path / "m.json", tmp_path / "l",
                             HeadParams, backbone=Backbone)


def _stage(cwd, *args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, str(REPO / "stages" / "train_head.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_stage_script_clear_error_without_features(tmp_path, monkeypatch, capsys):
    from tlpipe.cli import run_stage

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_stage(load_stage("train_head").main, ["--features", "nowhere"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    # The cut is read first: the folder holds no output of the extract stage at all.
    assert err.strip().splitlines()[-1] == "error: nowhere/cut.json: not found; rerun the extract stage (`dvc repro extract`)"
    assert "Traceback" not in err


def test_stage_script_trains_and_reruns_give_identical_files(project, tmp_path):
    """Two runs in separate processes (as DVC reruns a stage): byte-identical model, metrics and logs."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["head"].update(units=8, epochs=2, batch_size=8, lr=1e-3)
    params["backbone"].update(weights="none", layer=LAYER, pooling="avg", image_size=SIZE)
    outputs = ["models/head.keras", "metrics/train_head.json", "dvclive/train_head/metrics.json",
               "dvclive/train_head/plots/metrics/val/loss.tsv"]
    got = []
    for run in ("a", "b"):
        cwd = tmp_path / run
        cwd.mkdir()
        (cwd / "params.yaml").write_text(yaml.safe_dump(params))
        proc = _stage(cwd, "--features", str(project / "features"))
        assert proc.returncode == 0, proc.stderr
        got.append([(cwd / p).read_bytes() for p in outputs])
    assert got[0] == got[1]
    cwd = tmp_path / "a"
    assert read_model_info(cwd / "models" / "head.keras")["backbone"] == "vgg16"
    assert set(json.loads((cwd / "metrics" / "train_head.json").read_text())["head"]) == {"best_epoch", "val_accuracy", "lr_used", "epochs_used"}
    assert len((cwd / "dvclive" / "train_head" / "plots" / "metrics" / "val" / "loss.tsv").read_text().splitlines()) == 3
    assert not (cwd / "dvc.yaml").exists() and not (cwd / "dvclive" / "train_head" / "dvc.yaml").exists()
