"""The evaluate stage: every saved model on the test split, written as DVC metrics, plot data and
predictions.

A model whose base is frozen and whose metadata matches features/test.h5 is evaluated on the stored
features through its head (seconds); any other model runs on the test images (it preprocesses inside).
With test-time mirroring (evaluate.tta, model/tta.py) each model's outputs are averaged with its outputs
for the mirror images; the frozen-base models share one pass of their base over the mirror images.
The scores themselves are computed in `metrics`, the CSV tables in `tables`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from tlpipe import atomic
from tlpipe.runtime.errors import ModelFileError
from tlpipe.runtime.log import log, progress
from tlpipe.evaluate.metrics import headline, roc_points, scores
from tlpipe.evaluate.tables import confusion_rows, prediction_rows, roc_rows
from tlpipe.model.outputs import class_probabilities
from tlpipe.model import tta as mirror
from tlpipe.model.saved import FEATURE_KEYS

REQUIRED_MODELS = ("head",)
BATCH_SIZE = 32
SCORES_FILE = "scores.json"  # in the predictions folder: every test score, for the report


def can_use_features(info: dict, attrs: dict | None) -> bool:
    """The stored test features equal what this model's base computes: frozen base, same extraction."""
    if attrs is None or info.get("trainable_from") is not None:
        return False
    return all(_norm(info.get(k)) == _norm(attrs.get(k)) for k in FEATURE_KEYS)


def _norm(v):
    # Feature files store "no SHA-256" as an empty string, models as None.
    if isinstance(v, (list, tuple)):
        return [str(x) for x in v]
    return None if v == "" else v


def _predict_images(model, files, image_size: int, flips=(False,), desc: str = "test images") -> list[np.ndarray]:
    """The model's outputs for the image files, one array per entry of `flips` (True: for the mirror
    images), each file read and resized once."""
    import tensorflow as tf

    from tlpipe.features.inputs import image_dataset

    infer = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    out = [[] for _ in flips]
    ds = image_dataset(files, image_size, BATCH_SIZE, None)
    for batch in progress(ds, total=-(-len(files) // BATCH_SIZE), desc=desc, unit="batch"):
        for rows, flip in zip(out, flips):
            rows.append(infer(mirror.mirrored(batch) if flip else batch).numpy())
    return [np.concatenate(rows) if rows else np.zeros((0, 1)) for rows in out]


def _feature_key(info: dict) -> tuple:
    return tuple(str(_norm(info.get(k))) for k in FEATURE_KEYS)


def predict_model(model_path, test_features, test_rows, classes, tta: str = mirror.NONE,
                  mirror_features: dict | None = None) -> tuple[np.ndarray, list[str], np.ndarray, str]:
    """(labels, paths, raw outputs, "features"|"images") of one saved model on the test split.

    test_features: read_features' tuple for features/test.h5 or None; test_rows: a callable giving
    (files, labels, paths) of the test manifest (read only when the images are needed). tta "mirror":
    the outputs averaged with those for the mirror images; a frozen-base model takes the mirror images'
    pooled features from `mirror_features` (keyed by the feature metadata), computing them once.
    """
    from tlpipe.model.saved import head_submodel, load_model, model_info

    model = load_model(model_path)
    info = model_info(model)
    if list(info["class_names"]) != list(classes):
        raise ModelFileError(f"{model_path}: trained for classes {info['class_names']}, the test split has "
                             f"{list(classes)}; rerun the stage that writes it")
    attrs = test_features[3] if test_features is not None else None
    size = int(info["image_size"])
    if can_use_features(info, attrs):
        x, y, paths, _ = test_features
        head = head_submodel(model)
        raw = head.predict(x, batch_size=256, verbose=0)
        if tta == mirror.MIRROR:
            cache = {} if mirror_features is None else mirror_features
            key = _feature_key(info)
            if key not in cache:
                import keras

                pooled = keras.Model(model.inputs, model.get_layer("pool").output)
                cache[key] = _predict_images(pooled, test_rows()[0], size, (True,), desc="mirror images")[0]
            raw = mirror.average(raw, head.predict(cache[key], batch_size=256, verbose=0))
        return y, paths, raw, "features"
    files, labels, paths = test_rows()
    if tta == mirror.MIRROR:
        raw = mirror.average(*_predict_images(model, files, size, (False, True)))
    else:
        raw = _predict_images(model, files, size)[0]
    return np.asarray(labels, dtype=np.int64), paths, raw, "images"


def evaluate_predictions(y, paths, raw, classes) -> dict:
    """Everything written for one model, from its predictions: its scores and the three CSV texts."""
    proba = class_probabilities(raw, len(classes))
    header, rows = prediction_rows(paths, y, proba, classes)
    return {
        "scores": scores(y, proba, classes),
        "confusion": atomic.csv_text(["actual", "predicted"], confusion_rows(y, proba.argmax(axis=1), classes)),
        "roc": atomic.csv_text(["fpr", "tpr"], roc_rows(*roc_points(y, proba))),
        "predictions": atomic.csv_text(header, rows),
    }


def run_evaluate(features_dir, models_dir, split_dir, images_dir, metrics_out, plots_dir, predictions_dir,
                 model_names, tta: str = mirror.NONE) -> dict:
    """evaluate stage: every model of `model_names` (params.evaluate.models) present in `models_dir`.

    tta: "mirror" or "none" (evaluate.tta resolved, model/tta.py; recorded per model in scores.json, not
    in the metrics: params.yaml's evaluate.tta and augment.horizontal_flip already say it). A missing
    `head` model is an error, other missing models a warning. Writes the metrics JSON
    {model: {accuracy, roc_auc, loss}} (what `dvc exp show` compares), plots/confusion/<model>.csv,
    plots/roc/<model>.csv, and predictions/<model>.csv beside predictions/scores.json (every score
    of every model: also n, precision, recall, F1, and each per class); the three folders are
    rebuilt each run. Returns the scores.
    """
    from tlpipe.data.manifests import manifest_rows, read_class_names
    from tlpipe.features.featurefile import read_features
    from tlpipe.atomic import json_text, write_json

    features_dir, models_dir, split_dir = Path(features_dir), Path(models_dir), Path(split_dir)
    classes = read_class_names(split_dir / "classes.json")
    test_h5 = features_dir / "test.h5"
    test_features = read_features(test_h5) if test_h5.is_file() else None
    if test_features is not None and list(test_features[3]["class_names"]) != classes:
        test_features = None  # stale features: every model reads the images instead
    rows_cache: list = []

    def test_rows():
        if not rows_cache:
            rows_cache.append(manifest_rows(split_dir / "test.csv", images_dir, classes))
        return rows_cache[0]

    present = []
    for name in model_names:
        path = models_dir / f"{name}.keras"
        if path.is_file():
            present.append((name, path))
        elif name in REQUIRED_MODELS:
            raise ModelFileError(f"{path}: not found; run `dvc repro train_head` first")
        else:
            log.warning(f"{path} not found, skipped (run its stage to evaluate it)")

    results = {}
    # Each folder is rebuilt from scratch and swapped in at the end (no stale files); none on an error.
    with contextlib.ExitStack() as stack:
        dirs = {key: stack.enter_context(atomic.folder(path)) for key, path in
                (("confusion", Path(plots_dir) / "confusion"), ("roc", Path(plots_dir) / "roc"),
                 ("predictions", Path(predictions_dir)))}
        mirror_features: dict = {}
        for name, path in present:
            y, paths, raw, route = predict_model(path, test_features, test_rows, classes, tta, mirror_features)
            out = evaluate_predictions(y, paths, raw, classes)
            for key, d in dirs.items():
                if key != "roc" or out["roc"].count("\n") > 1:
                    atomic.write_text(d / f"{name}.csv", out[key])
            results[name] = s = {**out["scores"], "tta": tta}
            log.info(f"{name}: accuracy {s['accuracy']:.4f}, loss {s['loss']:.4f} on {s['n']} test images "
                     f"(via {route}{', averaged with their mirror images' if tta == mirror.MIRROR else ''})")
        atomic.write_text(dirs["predictions"] / SCORES_FILE, json_text(results))
    write_json(metrics_out, {name: headline(s) for name, s in results.items()})
    return results
