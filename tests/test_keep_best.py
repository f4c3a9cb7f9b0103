"""train.keep: best in the stages whose trained model is a view of the saved one (cached head_aug, its
head alone on the frozen suffix; cached finetune, the suffix and head; online, the full model): the
saved file holds the best epoch's weights, byte for byte those of a run stopped at that epoch.

The validation images are labelled with the other class, so the validation loss rises as the model
learns the training images: the best epoch comes early and the last one is worse (the tests check)."""

import json

import keras
import numpy as np
import pytest
from helpers import stored_cats_and_dogs, write_split

from tlpipe.config import validate_params
from tlpipe.features import viewcache
from tlpipe.model.saved import load_model
from tlpipe.train.compile import compile_classifier
from tlpipe.train.finetune import run_finetune
from tlpipe.train.head_aug import run_head_aug
from tlpipe.train.settings import TrainSettings
from tlpipe.train.models import cached_training_model
from tlpipe.train.views import CachedViews

SIZE = 32


def make_project(root, mode="cached"):
    images, rows = stored_cats_and_dogs(root)
    flipped = [{**r, "class_name": "dog" if r["label"] == 0 else "cat", "label": 1 - r["label"]}
               for r in (rows[4], rows[5], rows[10], rows[11])]
    split = write_split(root, {"train": rows[0:4] + rows[6:10], "validation": flipped,
                               "test": [rows[5], rows[11]]})
    # The cut named (as features/cut.json would give it): these tests are about training, not the probe.
    raw = {"backbone": {"weights": "none", "image_size": SIZE, "layer": "block5_pool", "pooling": "flatten"}, "compute": {"batch_size": 4},
           "head": {"units": 8, "dropout": 0.2, "standardize": False}, "augment": {"views": 2, "mode": mode},
           "head_aug": {"epochs": 5, "batch_size": 4, "lr": 1e-2},
           "finetune": {"epochs": 4, "batch_size": 4, "lr": 1e-3}}
    p = validate_params(raw)
    viewcache.build_from_manifests(split, images, root / "views.h5", backbone=p.backbone, augment=p.augment,
                                   compute=p.compute, unfreeze_from=p.finetune.unfreeze_from, progress=False)
    return p, split, images


def head_aug(tmp, p, split, images, tag, epochs=None, **kw):
    keras.backend.clear_session()  # auto-named layers count per process; a stage runs once per process
    if epochs is not None:
        p = p.model_copy(update={"head_aug": p.head_aug.model_copy(update={"epochs": epochs})})
    return run_head_aug(cache=tmp / "views.h5", split_dir=split, images_dir=images,
                        model_out=tmp / f"head_aug_{tag}.keras", metrics_out=tmp / f"m_{tag}.json",
                        live_dir=tmp / f"live_{tag}", backbone=p.backbone, compute=p.compute, head=p.head,
                        run=TrainSettings.from_params(p.head_aug, p.train.model_copy(update=kw)), augment=p.augment)


def fine(tmp, p, split, images, model_in, tag, epochs=None, **kw):
    keras.backend.clear_session()
    if epochs is not None:
        p = p.model_copy(update={"finetune": p.finetune.model_copy(update={"epochs": epochs})})
    return run_finetune(cache=tmp / "views.h5", split_dir=split, images_dir=images, model_in=model_in,
                        model_out=tmp / f"finetuned_{tag}.keras", metrics_out=tmp / f"mf_{tag}.json",
                        live_dir=tmp / f"livef_{tag}", backbone=p.backbone, compute=p.compute,
                        augment=p.augment, finetune=p.finetune,
                        run=TrainSettings.from_params(p.finetune, p.train.model_copy(update=kw)))


def scored_from_the_cache(tmp, model_path):
    """The saved model, run from the cache's boundary on the cache's plain validation activations."""
    model = load_model(model_path)
    with CachedViews(tmp / "views.h5", seed=0) as views:
        x, y = views.validation()
        boundary = views.attrs["boundary"]
    return compile_classifier(cached_training_model(model, boundary), 2, 1e-3).evaluate(
        x, y, batch_size=4, verbose=0, return_dict=True)


def check_kept(tmp, result, model_path, metrics_path):
    hist, best = result["history"], result["best_epoch"]
    assert best < len(hist), "the run must end past its best epoch for this test to mean anything"
    assert hist[-1]["val_loss"] > hist[best - 1]["val_loss"]
    assert result["kept_epoch"] == best
    scored = scored_from_the_cache(tmp, model_path)
    assert scored["loss"] == pytest.approx(hist[best - 1]["val_loss"], rel=1e-4)
    assert scored["accuracy"] == pytest.approx(hist[best - 1]["val_accuracy"])
    (name, figures), = json.loads(metrics_path.read_text()).items()
    assert figures["best_epoch"] == best  # the metrics file describes the saved model


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keep")
    p, split, images = make_project(tmp)
    result = head_aug(tmp, p, split, images, "best")
    return tmp, p, split, images, result


def test_head_aug_frozen_suffix_saves_the_best_epochs_head(cached):
    tmp, p, split, images, result = cached
    check_kept(tmp, result, tmp / "head_aug_best.keras", tmp / "m_best.json")
    # byte for byte the model of a run that stopped at the best epoch
    head_aug(tmp, p, split, images, "stopped", epochs=result["best_epoch"])
    assert (tmp / "head_aug_best.keras").read_bytes() == (tmp / "head_aug_stopped.keras").read_bytes()


def test_head_aug_keep_last_saves_the_last_epoch(cached):
    tmp, p, split, images, result = cached
    last = head_aug(tmp, p, split, images, "last", keep="last")
    assert last["history"] == result["history"] and last["kept_epoch"] == len(last["history"])
    scored = scored_from_the_cache(tmp, tmp / "head_aug_last.keras")
    assert scored["loss"] == pytest.approx(last["history"][-1]["val_loss"], rel=1e-4)
    assert (tmp / "head_aug_last.keras").read_bytes() != (tmp / "head_aug_best.keras").read_bytes()


def test_head_aug_patience_stops_and_keeps_the_best(cached):
    tmp, p, split, images, result = cached
    stopped = head_aug(tmp, p, split, images, "patient", patience=1)
    best = result["best_epoch"]
    assert stopped["epochs"] == best + 1 and stopped["history"] == result["history"][: best + 1]
    lines = (tmp / "live_patient" / "plots" / "metrics" / "val" / "loss.tsv").read_text().splitlines()
    assert len(lines) == 1 + best + 1
    assert (tmp / "head_aug_patient.keras").read_bytes() == (tmp / "head_aug_best.keras").read_bytes()


def test_cached_finetune_saves_the_best_epochs_suffix_and_head(cached):
    tmp, p, split, images, _ = cached
    start = tmp / "head_aug_last.keras"
    if not start.exists():
        head_aug(tmp, p, split, images, "last", keep="last")
    result = fine(tmp, p, split, images, start, "best")
    check_kept(tmp, result, tmp / "finetuned_best.keras", tmp / "mf_best.json")
    fine(tmp, p, split, images, start, "stopped", epochs=result["best_epoch"])
    assert (tmp / "finetuned_best.keras").read_bytes() == (tmp / "finetuned_stopped.keras").read_bytes()
    model, first = load_model(tmp / "finetuned_best.keras"), load_model(start)
    changed = [layer.name for layer in model.get_layer("base").layers if layer.weights and not all(
        np.array_equal(a, b) for a, b in zip(layer.get_weights(), first.get_layer("base").get_layer(layer.name).get_weights()))]
    assert changed and all(name.startswith("block5") for name in changed)  # the suffix trained, and was kept


def test_online_mode_saves_the_best_epoch(tmp_path):
    p, split, images = make_project(tmp_path, mode="online")
    p = p.model_copy(update={"head_aug": p.head_aug.model_copy(update={"epochs": 4})})
    result = head_aug(tmp_path, p, split, images, "best")
    hist, best = result["history"], result["best_epoch"]
    assert best < len(hist) and result["kept_epoch"] == best
    head_aug(tmp_path, p, split, images, "stopped", epochs=best)
    assert (tmp_path / "head_aug_best.keras").read_bytes() == (tmp_path / "head_aug_stopped.keras").read_bytes()
