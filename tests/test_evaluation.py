"""evaluation: metric functions on hand-made arrays, and the evaluate stage on a tiny project."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from tlpipe.evaluate import metrics as em
from tlpipe.evaluate import run as ev
from tlpipe.evaluate import tables
from tlpipe.model import saved
from tlpipe.runtime.errors import DataError, ModelFileError
from tlpipe.train.head import run_train_head

# ---------------------------------------------------------------- pure functions


def test_binary_scores_by_hand():
    y = [0, 0, 1, 1]
    p = [[0.1], [0.6], [0.8], [0.4]]  # predictions 0, 1, 1, 0
    m = em.scores(y, p, ["cat", "dog"])
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.5)  # 1 true positive of 2 predicted positives
    assert m["recall"] == pytest.approx(0.5)  # 1 of 2 positives found
    assert m["f1"] == pytest.approx(0.5)
    assert m["roc_auc"] == pytest.approx(0.75)  # 3 of 4 (positive, negative) pairs ranked right
    assert m["loss"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.8) + math.log(0.4)) / 4)
    assert m["n"] == 4
    assert m["per_class"]["dog"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "n": 2}
    assert em.headline(m) == {"accuracy": m["accuracy"], "roc_auc": m["roc_auc"], "loss": m["loss"]}


def test_positive_class_is_index_one():
    # All predicted positive: precision = share of positives, recall = 1.
    m = em.scores([0, 1, 1], [[0.9], [0.9], [0.9]])
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == 1.0
    assert m["per_class"]["0"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "n": 1}  # never predicted


def test_multiclass_macro_scores_by_hand():
    y = [0, 1, 2, 2]
    p = np.array([[0.7, 0.2, 0.1],   # 0 right
                  [0.6, 0.3, 0.1],   # 1 predicted 0
                  [0.1, 0.1, 0.8],   # 2 right
                  [0.2, 0.5, 0.3]])  # 2 predicted 1
    m = em.scores(y, p, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.5)
    # per class precision: 0: 1/2, 1: 0/1, 2: 1/1; recall: 0: 1, 1: 0, 2: 1/2
    assert m["precision"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert m["recall"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert m["f1"] == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)
    assert [m["per_class"][c]["precision"] for c in "abc"] == pytest.approx([0.5, 0, 1])
    assert [m["per_class"][c]["recall"] for c in "abc"] == pytest.approx([1, 0, 0.5])
    assert [m["per_class"][c]["n"] for c in "abc"] == [1, 1, 2]
    assert m["loss"] == pytest.approx(-np.mean(np.log([0.7, 0.3, 0.8, 0.3])))
    from sklearn.metrics import roc_auc_score

    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))


def test_log_loss_clips_zero_probability():
    assert em.log_loss([1], [[1.0, 0.0]]) == pytest.approx(-math.log(em.EPS))


def test_auc_undefined_with_one_class_present():
    assert em.scores([1, 1], [[0.3], [0.8]])["roc_auc"] is None
    fpr, tpr = em.roc_points([1, 1], [[0.3], [0.8]])
    assert len(fpr) == len(tpr) == 0


def test_bad_inputs():
    with pytest.raises(DataError, match="empty"):
        em.scores([], np.zeros((0, 1)))
    with pytest.raises(DataError, match="labels outside"):
        em.scores([0, 3], [[0.1], [0.2]])


def test_roc_points_binary_and_micro():
    fpr, tpr = em.roc_points([0, 0, 1, 1], [[0.1], [0.6], [0.8], [0.4]])
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # Area under the returned curve equals the AUC.
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)
    p = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    fpr, tpr = em.roc_points([0, 1, 2], p)  # perfect ranking over all (image, class) pairs
    assert np.trapezoid(tpr, fpr) == pytest.approx(1.0)


def test_confusion_and_prediction_rows():
    names = ["cat", "dog"]
    assert tables.confusion_rows([0, 1, 1], [0, 0, 1], names) == [["cat", "cat"], ["dog", "cat"], ["dog", "dog"]]
    header, rows = tables.prediction_rows(["a.jpg", "b.jpg"], [0, 1], [[0.25], [0.75]], names)
    assert header == ["path", "true", "predicted", "p_cat", "p_dog"]
    assert rows == [["a.jpg", "cat", "cat", "0.750000", "0.250000"], ["b.jpg", "dog", "dog", "0.250000", "0.750000"]]


def test_can_use_features():
    attrs = {k: "x" for k in saved.FEATURE_KEYS}
    attrs.update(class_names=["a", "b"], weights_sha256="", image_size=32)
    info = {**attrs, "weights_sha256": None, "trainable_from": None}
    assert ev.can_use_features(info, attrs)
    assert not ev.can_use_features({**info, "trainable_from": "block5_conv1"}, attrs)
    assert not ev.can_use_features({**info, "layer": "other"}, attrs)
    assert not ev.can_use_features({**info, "image_size": 64}, attrs)
    assert not ev.can_use_features(info, None)


# ---------------------------------------------------------------- the evaluate stage


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Test split + features, and models/head.keras (frozen) and models/finetuned.keras (unfrozen copy)."""
    from helpers import HeadParams, make_feature_project

    root = make_feature_project(tmp_path_factory.mktemp("evalproj"), counts={"train": 6, "validation": 3, "test": 5})
    run_train_head(root / "features", root / "models" / "head.keras", root / "metrics" / "th.json",
                   root / "dvclive", HeadParams)
    model = saved.load_model(root / "models" / "head.keras")
    saved.set_trainable_from(model, "block3_conv1")
    saved.save_model(model, root / "models" / "finetuned.keras")
    return root


def _run(root, out, names):
    return ev.run_evaluate(root / "features", root / "models", root / "data" / "split", root / "data" / "images",
                           out / "metrics" / "evaluate.json", out / "plots", out / "reports" / "predictions", names)


def test_evaluate_writes_metrics_plots_and_predictions(project, tmp_path, capsys):
    results = _run(project, tmp_path, ["head", "head_aug", "finetuned"])
    err = capsys.readouterr().err
    assert "head_aug.keras not found, skipped" in err
    assert "head: accuracy" in err and "(via features)" in err and "(via images)" in err

    # The DVC metrics file holds what `dvc exp show` compares; every score goes beside the predictions.
    metrics = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
    assert set(metrics) == {"head", "finetuned"}
    assert set(metrics["head"]) == {"accuracy", "roc_auc", "loss"}
    every = json.loads((tmp_path / "reports" / "predictions" / "scores.json").read_text())
    assert set(every) == {"head", "finetuned"} and every["head"]["n"] == 10 and every["head"]["tta"] == "none"
    assert {k: every["head"][k] for k in metrics["head"]} == metrics["head"]
    assert set(every["head"]["per_class"]) == {"cat", "dog"}
    assert sum(c["n"] for c in every["head"]["per_class"].values()) == 10
    assert results["head"]["f1"] == pytest.approx(every["head"]["f1"], abs=1e-6)

    pred = pd.read_csv(tmp_path / "reports" / "predictions" / "head.csv")
    test = pd.read_csv(project / "data" / "split" / "test.csv")
    assert list(pred.columns) == ["path", "true", "predicted", "p_cat", "p_dog"]
    assert list(pred["path"]) == list(test["path"]) and list(pred["true"]) == list(test["class_name"])
    np.testing.assert_allclose(pred["p_cat"] + pred["p_dog"], 1, atol=2e-6)
    assert metrics["head"]["accuracy"] == pytest.approx(np.mean(pred["true"] == pred["predicted"]), abs=1e-6)

    conf = pd.read_csv(tmp_path / "plots" / "confusion" / "head.csv")
    assert list(conf.columns) == ["actual", "predicted"]
    assert list(conf["actual"]) == list(pred["true"]) and list(conf["predicted"]) == list(pred["predicted"])
    roc = pd.read_csv(tmp_path / "plots" / "roc" / "head.csv")
    assert list(roc.columns) == ["fpr", "tpr"] and roc.iloc[0].tolist() == [0, 0] and roc.iloc[-1].tolist() == [1, 1]

    # The same weights through the images (finetuned: unfrozen) and through the features (head) agree.
    fin = pd.read_csv(tmp_path / "reports" / "predictions" / "finetuned.csv")
    np.testing.assert_allclose(fin["p_dog"], pred["p_dog"], atol=1e-4)
    assert not any(p.name.startswith(".") for p in (tmp_path / "plots").rglob("*"))


def test_rerun_is_identical_and_drops_stale_files(project, tmp_path):
    _run(project, tmp_path, ["head", "finetuned"])
    first = {p: p.read_bytes() for p in tmp_path.rglob("*.*") if p.is_file()}
    _run(project, tmp_path, ["head"])  # finetuned no longer listed: its files must go
    assert not (tmp_path / "plots" / "confusion" / "finetuned.csv").exists()
    assert not (tmp_path / "reports" / "predictions" / "finetuned.csv").exists()
    assert list(json.loads((tmp_path / "metrics" / "evaluate.json").read_text())) == ["head"]
    assert list(json.loads((tmp_path / "reports" / "predictions" / "scores.json").read_text())) == ["head"]
    for p in (tmp_path / "plots" / "confusion" / "head.csv", tmp_path / "reports" / "predictions" / "head.csv"):
        assert p.read_bytes() == first[p]


def test_missing_head_is_an_error(project, tmp_path):
    import shutil

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(project / "models" / "finetuned.keras", models)
    with pytest.raises(ModelFileError, match="head.keras: not found"):
        ev.run_evaluate(project / "features", models, project / "data" / "split", project / "data" / "images",
                        tmp_path / "m.json", tmp_path / "plots", tmp_path / "pred", ["finetuned", "head"])
    assert not (tmp_path / "m.json").exists()


def test_model_for_other_classes_is_refused(project, tmp_path):
    import shutil

    split = tmp_path / "split"
    shutil.copytree(project / "data" / "split", split)
    (split / "classes.json").write_text(json.dumps({"classes": ["ant", "bee"]}))
    with pytest.raises(ModelFileError, match="trained for classes"):
        ev.run_evaluate(project / "features", project / "models", split, project / "data" / "images",
                        tmp_path / "m.json", tmp_path / "plots", tmp_path / "pred", ["head"])


def test_stage_script(project, tmp_path, monkeypatch, capsys):
    import yaml
    from helpers import REPO, load_stage

    from tlpipe.cli import run_stage

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"]["models"] = ["head"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    run_stage(load_stage("evaluate").main,
              ["--features", str(project / "features"), "--models", str(project / "models"),
               "--split-dir", str(project / "data" / "split"), "--images", str(project / "data" / "images")])
    assert set(json.loads((tmp_path / "metrics" / "evaluate.json").read_text())) == {"head"}
    every = json.loads((tmp_path / "reports" / "predictions" / "scores.json").read_text())
    assert every["head"]["n"] == 10 and every["head"]["tta"] == "mirror"  # auto, with horizontal_flip on
    assert (tmp_path / "plots" / "roc" / "head.csv").is_file()
    assert (tmp_path / "reports" / "predictions" / "head.csv").is_file()


def test_mirror_tta_averages_each_model_with_its_mirror_images(project, tmp_path, capsys):
    """evaluate.tta mirror: each test image's probabilities are the mean of the model's outputs for the
    image and for its mirror image, by both routes (stored features + the base over the mirror images,
    and the images through the whole model)."""
    from tlpipe.data.manifests import manifest_rows
    from tlpipe.features.inputs import read_resized

    plain = _run(project, tmp_path / "plain", ["head", "finetuned"])
    both = ev.run_evaluate(project / "features", project / "models", project / "data" / "split",
                           project / "data" / "images", tmp_path / "m.json", tmp_path / "plots",
                           tmp_path / "pred", ["head", "finetuned"], tta="mirror")
    assert "averaged with their mirror images" in capsys.readouterr().err
    assert json.loads((tmp_path / "pred" / "scores.json").read_text())["head"]["tta"] == "mirror"

    files, _, _ = manifest_rows(project / "data" / "split" / "test.csv", project / "data" / "images", ["cat", "dog"])
    model = saved.load_model(project / "models" / "head.keras")
    size = saved.model_info(model)["image_size"]
    x = np.stack([read_resized(str(f), size).numpy() for f in files])
    p_plain = model.predict(x, verbose=0)[:, 0].astype(np.float64)
    p_mirror = model.predict(x[:, :, ::-1, :], verbose=0)[:, 0].astype(np.float64)
    assert np.abs(p_plain - p_mirror).max() > 1e-3  # the test images are not their own mirror images
    for name in ("head", "finetuned"):
        pred = pd.read_csv(tmp_path / "pred" / f"{name}.csv")
        np.testing.assert_allclose(pred["p_dog"], (p_plain + p_mirror) / 2, atol=1e-4)
        assert both[name]["loss"] != plain[name]["loss"]


def test_tta_auto_follows_the_horizontal_flip():
    from tlpipe.model import tta

    assert tta.resolve("auto", True) == "mirror" and tta.resolve("auto", False) == "none"
    assert tta.resolve("none", True) == "none" and tta.resolve("mirror", False) == "mirror"
    x = np.arange(2 * 3 * 4 * 3).reshape(2, 3, 4, 3)
    assert (tta.mirrored(x)[:, :, 0] == x[:, :, 3]).all() and (tta.mirrored(tta.mirrored(x)) == x).all()
