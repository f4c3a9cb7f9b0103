"""train_head_aug and finetune on tiny data: cached and online modes, what trains and what stays put."""

import json
from dataclasses import replace

import keras
import numpy as np
import pytest
from helpers import stored_cats_and_dogs, write_split

from tlpipe.features import viewcache, viewfile
from tlpipe.config import validate_params
from tlpipe.runtime.errors import ConfigError, FeatureFileError
from tlpipe.model.saved import load_model, model_info
from tlpipe.train.compile import compile_classifier
from tlpipe.train.views import CachedViews, epoch_views
from tlpipe.train.finetune import run_finetune
from tlpipe.train.head_aug import run_head_aug
from tlpipe.train.settings import TrainSettings
from tlpipe.train.models import cached_training_model, freeze_batchnorm

SIZE = 32


def make_project(root, params_override=None):
    """data/split manifests + data/images for 2 classes, and validated params for a tiny run."""
    images, rows = stored_cats_and_dogs(root)
    split = write_split(root, {"train": rows[0:4] + rows[6:10], "validation": [rows[4], rows[10]],
                               "test": [rows[5], rows[11]]})
    # The cut named (as features/cut.json would give it): these tests are about training, not the probe.
    raw = {"backbone": {"weights": "none", "image_size": SIZE, "layer": "block5_pool", "pooling": "flatten"}, "compute": {"batch_size": 4},
           "head": {"units": 8, "dropout": 0.2, "standardize": False}, "augment": {"views": 2},
           "head_aug": {"epochs": 2, "batch_size": 4, "lr": 1e-3},
           "finetune": {"epochs": 1, "batch_size": 4, "lr": 1e-3}}
    for k, v in (params_override or {}).items():
        raw.setdefault(k, {}).update(v)
    return validate_params(raw), split, images


def head_aug(tmp, p, split, images, tag="a"):
    keras.backend.clear_session()  # auto-named layers count per process; a stage runs once per process
    return run_head_aug(cache=tmp / "views.h5", split_dir=split, images_dir=images,
                        model_out=tmp / f"head_aug_{tag}.keras", metrics_out=tmp / f"m_{tag}.json",
                        live_dir=tmp / f"live_{tag}", backbone=p.backbone, compute=p.compute, head=p.head,
                        run=TrainSettings.from_params(p.head_aug), augment=p.augment)


def fine(tmp, p, split, images, model_in, tag="f", **run):
    return run_finetune(cache=tmp / "views.h5", split_dir=split, images_dir=images, model_in=model_in,
                        model_out=tmp / f"finetuned_{tag}.keras", metrics_out=tmp / f"mf_{tag}.json",
                        live_dir=tmp / f"livef_{tag}", backbone=p.backbone, compute=p.compute,
                        augment=p.augment, finetune=p.finetune,
                        run=replace(TrainSettings.from_params(p.finetune), **run))


def base_weights(model):
    return {l.name: [w.copy() for w in l.get_weights()] for l in model.get_layer("base").layers if l.weights}


def build_cache(tmp, p, split, images):
    return viewcache.build_from_manifests(split, images, tmp / "views.h5", backbone=p.backbone,
                                          augment=p.augment, compute=p.compute,
                                          unfreeze_from=p.finetune.unfreeze_from, progress=False)


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cached")
    p, split, images = make_project(tmp)
    build_cache(tmp, p, split, images)
    result = head_aug(tmp, p, split, images)
    return tmp, p, split, images, result


def test_head_aug_cached_trains_only_the_head(cached_run):
    tmp, p, split, images, result = cached_run
    from tlpipe.features.pretrained import build_base

    model = load_model(tmp / "head_aug_a.keras")
    info = model_info(model)
    assert info["class_names"] == ["cat", "dog"] and info["trainable_from"] is None
    fresh = build_base("vgg16", "none", SIZE)  # the base the cache and the model were built from
    want = {l.name: l.get_weights() for l in fresh.layers if l.weights}
    for name, ws in base_weights(model).items():  # prefix AND suffix unchanged
        for a, b in zip(ws, want[name]):
            np.testing.assert_array_equal(a, b)
    history = result["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    best = min(history, key=lambda row: row["val_loss"])
    assert json.loads((tmp / "m_a.json").read_text()) == {"head_aug_a": {
        "best_epoch": best["epoch"], "val_accuracy": pytest.approx(best["val_accuracy"], abs=1e-6),
        "lr_used": 1e-3, "epochs_used": 2}}
    val_loss = (tmp / "live_a" / "plots" / "metrics" / "val" / "loss.tsv").read_text().splitlines()
    assert [float(line.split("\t")[1]) for line in val_loss[1:]] == pytest.approx(
        [row["val_loss"] for row in history], abs=1e-6)


def test_saved_model_is_the_trained_one_validated_on_the_cached_plain_images(cached_run):
    """The saved model, run from the cache's boundary on its plain validation activations, scores what
    the kept epoch (train.keep: best, the best one) logged: it is the model training kept, and the head
    trained on the frozen suffix's output is the head of the full model."""
    tmp, p, split, images, result = cached_run
    model = load_model(tmp / "head_aug_a.keras")
    with CachedViews(tmp / "views.h5", seed=p.head_aug.seed) as views:
        x, y = views.validation()
        boundary = views.attrs["boundary"]
    scored = compile_classifier(cached_training_model(model, boundary), 2, 1e-3).evaluate(
        x, y, batch_size=4, verbose=0, return_dict=True)
    kept = result["history"][result["kept_epoch"] - 1]
    assert result["kept_epoch"] == result["best_epoch"]
    assert scored["loss"] == pytest.approx(kept["val_loss"], rel=1e-5)
    assert scored["accuracy"] == pytest.approx(kept["val_accuracy"])


def test_head_aug_is_deterministic(cached_run):
    tmp, p, split, images, _ = cached_run
    head_aug(tmp, p, split, images, tag="b")
    assert (tmp / "head_aug_a.keras").read_bytes() == (tmp / "head_aug_b.keras").read_bytes()
    assert json.loads((tmp / "m_a.json").read_text())["head_aug_a"] == json.loads((tmp / "m_b.json").read_text())["head_aug_b"]


def test_finetune_cached_trains_block5_only(cached_run):
    tmp, p, split, images, _ = cached_run
    start = base_weights(load_model(tmp / "head_aug_a.keras"))
    # keep: last, so that the saved model is the trained one (with best, a start that no epoch beats is kept).
    result = fine(tmp, p, split, images, tmp / "head_aug_a.keras", keep="last")
    model = load_model(tmp / "finetuned_f.keras")
    assert model_info(model)["trainable_from"] == "block5_conv1"
    assert set(json.loads((tmp / "mf_f.json").read_text())["finetuned_f"]) == {"best_epoch", "val_accuracy", "lr_used", "epochs_used"}
    assert len(result["history"]) == p.finetune.epochs
    after = base_weights(model)
    for name in after:
        same = all(np.array_equal(a, b) for a, b in zip(after[name], start[name]))
        assert same == (not name.startswith("block5")), name


def test_finetune_refuses_unknown_layer_and_mismatched_cache(cached_run):
    tmp, p, split, images, _ = cached_run
    bad = p.model_copy(update={"finetune": p.finetune.model_copy(update={"unfreeze_from": "block9_conv1"})})
    with pytest.raises(ConfigError, match="block9_conv1.*block5_conv1"):
        fine(tmp, bad, split, images, tmp / "head_aug_a.keras", tag="bad")
    other = p.model_copy(update={"finetune": p.finetune.model_copy(update={"unfreeze_from": "block4_conv1"})})
    with pytest.raises(FeatureFileError, match="unfreeze_from"):
        fine(tmp, other, split, images, tmp / "head_aug_a.keras", tag="bad2")


def test_online_mode_trains_the_full_model(tmp_path):
    p, split, images = make_project(tmp_path, {"augment": {"mode": "online"},
                                               "head_aug": {"epochs": 1}})
    build_cache(tmp_path, p, split, images)  # only a marker in online mode
    result = head_aug(tmp_path, p, split, images)
    assert result["epochs"] == 1
    model = load_model(tmp_path / "head_aug_a.keras")
    assert model_info(model)["trainable_from"] is None
    # validation ran on the plain images through the saved model: same accuracy when recomputed
    from tlpipe.data.manifests import manifest_rows
    from tlpipe.train.online import load_images

    files, labels, _ = manifest_rows(split / "validation.csv", images, ["cat", "dog"])
    pred = (model.predict(load_images(files, SIZE), verbose=0)[:, 0] > 0.5).astype(int)
    assert result["last"]["val_accuracy"] == pytest.approx(float(np.mean(pred == np.array(labels))))


def test_batchnorm_stays_in_inference_mode():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization()])
    outer = keras.Sequential([keras.Input((4,)), inner, keras.layers.BatchNormalization(), keras.layers.Dense(1)])
    freeze_batchnorm(outer)
    bns = [l for l in inner.layers + outer.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bns) == 2 and not any(l.trainable for l in bns)
    assert inner.layers[0].trainable and outer.layers[-1].trainable
    x = np.random.RandomState(0).normal(5, 2, (8, 4)).astype("float32")
    np.testing.assert_allclose(outer(x, training=True), outer(x, training=False), rtol=1e-6)


# ---------------------------------------------------------------- the training data sources

def test_cached_views_give_the_readers_epochs_and_the_plain_validation(cached_run):
    tmp, p, *_ = cached_run
    with CachedViews(tmp / "views.h5", seed=5) as data, viewfile.ViewReader(tmp / "views.h5") as reader:
        assert data.fingerprint == {"mode": "cached", "cache": viewfile.read_attrs(tmp / "views.h5")}
        for e in range(3):
            x, y = data.epoch(e)
            want_x, want_y = reader.read_views(epoch_views(reader.n, reader.views, 5, e))
            np.testing.assert_array_equal(x, want_x)
            np.testing.assert_array_equal(y, want_y)
        assert not np.array_equal(data.epoch(0)[0], data.epoch(1)[0])  # epochs show other views
        val_x, val_y = viewfile.load_part(tmp / "views.h5", "validation")
        np.testing.assert_array_equal(data.validation()[0], val_x.astype(np.float32))
        assert data.validation()[0].dtype == np.float32
        np.testing.assert_array_equal(data.validation()[1], val_y)


def test_cached_views_refuse_a_cache_of_other_settings(cached_run):
    tmp, *_ = cached_run
    with pytest.raises(FeatureFileError, match="views: file has 2, params say 3"):
        CachedViews(tmp / "views.h5", seed=0, expect={"views": 3})


def test_frozen_suffix_training_equals_running_the_suffix_every_epoch(cached_run):
    """train_head_aug trains the head on the suffix's output computed once per view; training the
    model from the boundary (suffix frozen, run every epoch) on the same views gives the same head."""
    from tlpipe.model.saved import head_submodel
    from tlpipe.train.augmented import choose_data
    from tlpipe.train.views import FrozenSuffix
    from tlpipe.train.loop import fit
    from tlpipe.train.models import frozen_features_model, new_model

    tmp, p, split, images, _ = cached_run
    classes = ["cat", "dog"]

    def full():
        keras.backend.clear_session()
        return new_model(p.backbone, "float32", p.head.units, p.head.dropout, 3, classes)

    fast_full = full()
    head, frozen = choose_data(fast_full, p.augment, 4, cache=tmp / "views.h5", split_dir=split,
                               images_dir=images, expect={})
    assert isinstance(frozen, FrozenSuffix)
    slow_full = full()
    suffix_model = cached_training_model(slow_full, frozen.fingerprint["cache"]["boundary"])
    with CachedViews(tmp / "views.h5", seed=4) as views:
        running = frozen_features_model(suffix_model)
        for e in range(3):  # each epoch's inputs are the suffix run on that epoch's views
            x, y = views.epoch(e)
            np.testing.assert_allclose(frozen.epoch(e)[0], running.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(frozen.epoch(e)[1], y)
        fast = fit(compile_classifier(head, 2, 1e-2), frozen, epochs=3, batch_size=4, seed=4, live_dir=tmp / "live_fast")
        slow = fit(compile_classifier(suffix_model, 2, 1e-2), views, epochs=3, batch_size=4, seed=4,
                   live_dir=tmp / "live_slow")
    for a, b in zip(fast["history"], slow["history"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    assert fast["history"][0]["train_loss"] != fast["history"][-1]["train_loss"]  # the head did train
    for a, b in zip(head_submodel(fast_full).get_weights(), head_submodel(slow_full).get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_online_epochs_show_view_epoch_or_the_views_asked_for():
    """By default epoch e augments every image as view e; `views` picks each image's view instead."""
    from tlpipe.features.augment import augment_settings
    from tlpipe.train.online import OnlineAugmented

    images = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    val = np.zeros((1, 16, 16, 3), np.float32)
    settings = augment_settings({"rotation_range": 40.0, "zoom_range": 0.2, "horizontal_flip": True, "seed": 7})
    plain = OnlineAugmented(images, [0, 1, 0], val, [1], settings)
    by_epoch = {e: plain.epoch(e)[0] for e in range(3)}
    assert not np.allclose(by_epoch[0], by_epoch[1])  # views differ, so the checks below can fail
    np.testing.assert_array_equal(plain.epoch(1)[0], by_epoch[1])  # an epoch depends on e alone
    chosen = OnlineAugmented(images, [0, 1, 0], val, [1], settings, views=lambda e: [2, 0, 1])
    x, y = chosen.epoch(5)
    for i, v in enumerate([2, 0, 1]):
        np.testing.assert_array_equal(x[i], by_epoch[v][i])
    np.testing.assert_array_equal(y, [0, 1, 0])
    assert plain.validation()[0] is val and plain.validation()[1].tolist() == [1]
    assert plain.fingerprint == {"mode": "online", "augment": settings}


def test_a_boundary_at_the_cut_is_not_called_a_residual_connection(cached_run):
    # A cache whose boundary is the model's last base layer (unfreeze_from after the cut): say so.
    tmp, p, split, images, _ = cached_run
    full = load_model(tmp / "head_aug_a.keras")
    with pytest.raises(ConfigError, match="lies after the cut") as err:
        cached_training_model(full, "block5_pool")
    assert "residual" not in str(err.value)


def test_bfloat16_cache_head_aug_and_cosine_finetune(tmp_path):
    # What compute.precision: bfloat16 runs (the fast choice on a CPU with AVX-512 BF16 or AMX).
    p, split, images = make_project(tmp_path, {"compute": {"precision": "bfloat16"},
                                               "finetune": {"epochs": 2, "schedule": "cosine"}})
    build_cache(tmp_path, p, split, images)
    with viewfile.ViewReader(tmp_path / "views.h5") as reader:
        assert reader.attrs["precision"] == "bfloat16"
    head_aug(tmp_path, p, split, images)
    start = base_weights(load_model(tmp_path / "head_aug_a.keras"))
    result = fine(tmp_path, p, split, images, tmp_path / "head_aug_a.keras")
    model = load_model(tmp_path / "finetuned_f.keras")
    conv = model.get_layer("base").get_layer("block5_conv1")
    # Mixed precision: bfloat16 arithmetic, float32 variables (small updates are not rounded away).
    assert conv.compute_dtype == "bfloat16" and conv.kernel.dtype == "float32"
    after = base_weights(model)
    assert all(np.array_equal(a, b) for a, b in zip(after["block4_conv1"], start["block4_conv1"]))
    assert not all(np.array_equal(a, b) for a, b in zip(after["block5_conv1"], start["block5_conv1"]))
    assert len(result["history"]) == 2 and all(np.isfinite(r["val_loss"]) for r in result["history"])
    x = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    assert np.all(np.isfinite(np.asarray(model.predict(x, verbose=0), np.float32)))


def test_head_aug_lr_auto_keeps_the_sweeps_run_and_says_so(cached_run, monkeypatch):
    """head_aug.lr: auto trains the head at each candidate on the views' pooled features and saves the
    chosen rate's run: the same weights as an explicit run at that rate; the metrics name the rate."""
    from tlpipe.train import lr_search

    tmp, p, split, images, _ = cached_run
    monkeypatch.setattr(lr_search, "CANDIDATES", (1e-5, 1e-2))
    auto = validate_params({**p.model_dump(by_alias=True), "head_aug": {**p.head_aug.model_dump(), "lr": "auto"}})
    result = head_aug(tmp, auto, split, images, tag="auto")
    metrics = json.loads((tmp / "m_auto.json").read_text())["head_aug_auto"]
    assert [r["lr"] for r in metrics["lr_search"]] == [1e-5, 1e-2]
    assert metrics["lr_used"] == lr_search.choose(metrics["lr_search"])
    explicit = validate_params({**p.model_dump(by_alias=True), "head_aug": {**p.head_aug.model_dump(), "lr": metrics["lr_used"]}})
    again = head_aug(tmp, explicit, split, images, tag="explicit")
    assert again["history"] == result["history"]
    a, b = (load_model(tmp / f"head_aug_{t}.keras").get_weights() for t in ("auto", "explicit"))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    online = validate_params({**auto.model_dump(by_alias=True), "augment": {**auto.augment.model_dump(), "mode": "online"}})
    with pytest.raises(ConfigError, match="head_aug.lr: auto needs augment.mode: cached"):
        head_aug(tmp, online, split, images, tag="online")


def test_head_aug_auto_epochs_are_the_step_budget_of_the_training_images(cached_run, monkeypatch):
    """head_aug.epochs: auto trains auto_epochs(training images, batch size) epochs and writes them to
    the metrics (the budget made small here, so the test stays short)."""
    from tlpipe.train import head_aug as module

    tmp, p, split, images, _ = cached_run
    monkeypatch.setattr(module, "STEPS", 7)
    auto = validate_params({**p.model_dump(by_alias=True), "head_aug": {**p.head_aug.model_dump(), "epochs": "auto"}})
    n_train = len((split / "train.csv").read_text().strip().splitlines()) - 1  # less the header
    expected = module.auto_epochs(n_train, auto.head_aug.batch_size)
    assert expected > 1 and expected != p.head_aug.epochs
    result = head_aug(tmp, auto, split, images, tag="epochs_auto")
    assert len(result["history"]) == expected
    assert json.loads((tmp / "m_epochs_auto.json").read_text())["head_aug_epochs_auto"]["epochs_used"] == expected


def test_finetune_auto_rate_and_epochs_come_from_the_start_model_and_the_data(cached_run):
    """finetune.lr: auto is auto_lr of the rate in the start model's metrics; finetune.epochs: auto
    the epochs of the step budget for the training images; both written to the metrics."""
    from tlpipe.train import finetune

    tmp, p, split, images, _ = cached_run
    auto = validate_params({**p.model_dump(by_alias=True),
                            "finetune": {**p.finetune.model_dump(by_alias=True), "lr": "auto", "epochs": "auto"}})
    start = tmp / "start.json"
    start.write_text(json.dumps({"head_aug_a": {"best_epoch": 1, "val_accuracy": 0.5, "lr_used": 1e-3, "epochs_used": 2}}))
    keras.backend.clear_session()
    kw = dict(cache=tmp / "views.h5", split_dir=split, images_dir=images, model_in=tmp / "head_aug_a.keras",
              live_dir=tmp / "live_fa", backbone=auto.backbone, compute=auto.compute, augment=auto.augment,
              finetune=auto.finetune)
    from unittest import mock

    with mock.patch.object(finetune, "STEPS", 5):  # 8 images in batches of 4: 2 steps an epoch, 3 epochs
        result = run_finetune(**kw, model_out=tmp / "fa.keras", metrics_out=tmp / "mfa.json",
                              run=TrainSettings.from_params(auto.finetune), start_metrics=start)
    assert len(result["history"]) == 3
    got = json.loads((tmp / "mfa.json").read_text())["fa"]
    assert got["lr_used"] == pytest.approx(finetune.auto_lr(1e-3)) and got["epochs_used"] == 3
    with pytest.raises(ConfigError, match="missing.json"):
        run_finetune(**kw, model_out=tmp / "fb.keras", metrics_out=tmp / "mfb.json",
                     run=TrainSettings.from_params(auto.finetune), start_metrics=tmp / "missing.json")
    assert not (tmp / "fb.keras").exists() and not (tmp / "mfb.json").exists()


@pytest.mark.parametrize("n, batch, epochs", [(1500, 20, 8), (685, 20, 18), (200, 20, 30), (8, 4, 30), (100000, 20, 1)])
def test_auto_epochs_is_a_step_budget_capped(n, batch, epochs):
    from tlpipe.train.finetune import auto_epochs

    assert auto_epochs(n, batch) == epochs


# head_aug's budget: 3000 steps, at most 100 epochs (the shared sets' 1500 and 685 training photos: 40, 86).
@pytest.mark.parametrize("n, batch, epochs", [(1500, 20, 40), (685, 20, 86), (200, 20, 100), (100000, 20, 1)])
def test_head_aug_auto_epochs_is_a_step_budget_capped(n, batch, epochs):
    from tlpipe.train.head_aug import auto_epochs

    assert auto_epochs(n, batch) == epochs


@pytest.mark.parametrize("start, lr", [(1e-5, 3e-6), (1e-4, 3e-5), (3e-4, 3e-5), (3e-3, 3e-5)])
def test_auto_lr_is_a_fraction_of_the_start_rate_capped(start, lr):
    from tlpipe.train.finetune import auto_lr

    assert auto_lr(start) == pytest.approx(lr)


def test_finetune_keeps_the_start_model_when_no_epoch_beats_it(cached_run, caplog):
    """train.keep: best counts the start model as epoch 0: a rate that wrecks the model (every epoch's
    validation loss above the start's) saves the start model unchanged, best_epoch 0."""
    import logging
    import re

    tmp, p, split, images, _ = cached_run
    keras.backend.clear_session()
    start = load_model(tmp / "head_aug_a.keras")
    with caplog.at_level(logging.INFO, logger="tlpipe"):
        result = fine(tmp, p, split, images, tmp / "head_aug_a.keras", tag="wreck", lr=1.0, epochs=2)
    assert all(r["val_loss"] > result["best"]["val_loss"] for r in result["history"]), result
    assert result["best_epoch"] == result["kept_epoch"] == 0
    # The log says the start replaced the best epoch fit kept, not two kept models in a row unexplained.
    best = min(range(2), key=lambda i: result["history"][i]["val_loss"]) + 1
    assert re.search(rf"kept the start model instead of epoch {best} \([0-9.]+\): no epoch's val_loss below",
                     caplog.text), caplog.text
    saved = load_model(tmp / "finetuned_wreck.keras")
    assert all(np.array_equal(a, b) for a, b in zip(saved.get_weights(), start.get_weights()))
    got = json.loads((tmp / "mf_wreck.json").read_text())["finetuned_wreck"]
    assert got["best_epoch"] == 0 and got["val_accuracy"] == pytest.approx(result["best"]["val_accuracy"])
    # dvclive has the start at step 0 (validation only), so the report's curves dash the model saved.
    from tlpipe.report.curves import save_curves

    for key in ("loss", "accuracy"):
        rows = [line.split("\t") for line in
                (tmp / "livef_wreck" / "plots" / "metrics" / "val" / f"{key}.tsv").read_text().splitlines()[1:]]
        assert [int(r[-2]) for r in rows] == [0, 1, 2]
        assert float(rows[0][-1]) == pytest.approx(result["best"][f"val_{key}"], abs=1e-6)
    assert (tmp / "livef_wreck" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()[1].split("\t")[-2] == "1"
    assert [(r["epochs"], r["best_epoch"]) for r in save_curves(tmp, tmp / "curves") if r["stage"] == "livef_wreck"] == [(2, 0)]
    # keep: last saves the wrecked model instead.
    fine(tmp, p, split, images, tmp / "head_aug_a.keras", tag="wreck_last", lr=1.0, epochs=2, keep="last")
    last = load_model(tmp / "finetuned_wreck_last.keras")
    assert not all(np.array_equal(a, b) for a, b in zip(last.get_weights(), start.get_weights()))
