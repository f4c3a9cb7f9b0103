"""Test-split evaluation of saved models: metrics, confusion/ROC plot data and per-image predictions.

Pure functions compute from (labels, probabilities); `run_evaluate` does the I/O. A model whose base
is frozen and whose metadata matches features/test.h5 is evaluated on the stored features through its
head (seconds); any other model runs on the test images (it preprocesses inside).

Binary: positive class = index 1; precision/recall/F1/ROC AUC of that class; ROC curve of P(class 1).
More classes: macro averages, ROC AUC one-vs-rest macro; the ROC curve is the micro-average
(every (image, class) pair as one binary decision).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

from tlpipe import atomic
from tlpipe.errors import DataError, ModelFileError

# Metadata that must match the test feature file for the features shortcut to be valid.
MATCH_KEYS = ("backbone", "weights", "weights_sha256", "layer", "pooling", "image_size", "preprocessing",
              "class_names")
REQUIRED_MODELS = ("head",)
EPS = 1e-7  # Keras' epsilon: log loss clips probabilities the same way training did
BATCH_SIZE = 32


# ---------------------------------------------------------------- pure computations

def to_probabilities(raw) -> np.ndarray:
    """Model outputs -> (N, K) class probabilities: one sigmoid column p becomes [1 - p, p]."""
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim == 1:
        raw = raw[:, None]
    if raw.shape[1] == 1:
        return np.concatenate([1.0 - raw, raw], axis=1)
    return raw


def log_loss(y_true, proba) -> float:
    """Mean negative log-probability of the true class (clipped at EPS)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    p = np.clip(np.asarray(proba, dtype=np.float64)[np.arange(len(y_true)), y_true], EPS, 1.0)
    return float(-np.mean(np.log(p)))


def classification_metrics(y_true, proba) -> dict:
    """accuracy, loss, precision, recall, f1, roc_auc (None when only one class is present), n."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

    y_true = np.asarray(y_true, dtype=np.int64)
    proba = to_probabilities(proba)
    n, k = proba.shape
    if len(y_true) != n:
        raise ValueError(f"{len(y_true)} labels for {n} predictions")
    if n == 0:
        raise DataError("the test split is empty: nothing to evaluate; give data.split a test share")
    if y_true.min() < 0 or y_true.max() >= k:
        raise DataError(f"labels outside 0..{k - 1} for a {k}-class model")
    y_pred = proba.argmax(axis=1)
    binary = k == 2
    avg = {"average": "binary", "pos_label": 1} if binary else {"average": "macro"}
    prec, rec, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=list(range(k)), zero_division=0,
                                                       **avg)
    present = np.unique(y_true)
    auc = None
    if binary and len(present) == 2:
        auc = float(roc_auc_score(y_true, proba[:, 1]))
    elif not binary and len(present) == k:
        auc = float(roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=list(range(k))))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "loss": log_loss(y_true, proba),
        "precision": float(prec),
        "recall": float(rec),
        "f1": float(f1),
        "roc_auc": auc,
        "n": int(n),
    }


def roc_points(y_true, proba) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr): of P(class 1) for two classes, the micro-average for more. Empty if undefined."""
    from sklearn.metrics import roc_curve

    y_true = np.asarray(y_true, dtype=np.int64)
    proba = to_probabilities(proba)
    if proba.shape[1] == 2:
        truth, score = (y_true == 1).astype(int), proba[:, 1]
    else:
        truth = np.eye(proba.shape[1], dtype=int)[y_true].ravel()
        score = proba.ravel()
    if len(np.unique(truth)) < 2:  # one class only: no curve
        return np.zeros(0), np.zeros(0)
    fpr, tpr, _ = roc_curve(truth, score)
    return fpr, tpr


def confusion_rows(y_true, y_pred, class_names) -> list[list[str]]:
    """One [actual, predicted] row of class names per image (DVC's confusion template counts them)."""
    return [[class_names[int(t)], class_names[int(p)]] for t, p in zip(y_true, y_pred)]


def prediction_rows(paths, y_true, proba, class_names) -> tuple[list[str], list[list]]:
    """(header, rows): path, true, predicted, p_<class> for every class, in the given order."""
    proba = to_probabilities(proba)
    header = ["path", "true", "predicted"] + [f"p_{c}" for c in class_names]
    rows = []
    for path, t, p in zip(paths, y_true, proba):
        rows.append([path, class_names[int(t)], class_names[int(p.argmax())]] + [_num(v) for v in p])
    return header, rows


def _num(v: float) -> str:
    # Fixed precision: the CSVs stay byte-identical and readable.
    return f"{float(v):.6f}"


def can_use_features(info: dict, attrs: dict | None) -> bool:
    """The stored test features equal what this model's base computes: frozen base, same extraction."""
    if attrs is None or info.get("trainable_from") is not None:
        return False
    return all(_norm(info.get(k)) == _norm(attrs.get(k)) for k in MATCH_KEYS)


def _norm(v):
    # Feature files store "no SHA-256" as an empty string, models as None.
    if isinstance(v, (list, tuple)):
        return [str(x) for x in v]
    return None if v == "" else v


# ---------------------------------------------------------------- I/O

def _csv_text(header, rows) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


class _FreshDir:
    """A folder rebuilt from scratch under a temp name and swapped in at the end (no stale files)."""

    def __init__(self, final):
        self.final = Path(final)
        self.tmp = atomic.temp_dir(self.final)

    def write(self, name: str, text: str) -> None:
        atomic.write_text(self.tmp / name, text)

    def commit(self) -> None:
        atomic.replace_dir(self.tmp, self.final)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _predict_images(model, files, image_size: int) -> np.ndarray:
    import tensorflow as tf
    from tqdm.auto import tqdm

    from tlpipe.features.inputs import image_dataset

    infer = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    out = []
    ds = image_dataset(files, image_size, BATCH_SIZE, None)
    for batch in tqdm(ds, total=-(-len(files) // BATCH_SIZE), desc="test images", unit="batch", file=sys.stderr):
        out.append(infer(batch).numpy())
    return np.concatenate(out) if out else np.zeros((0, 1))


def predict_model(model_path, test_features, test_rows, classes) -> tuple[np.ndarray, list[str], np.ndarray, str]:
    """(labels, paths, raw outputs, "features"|"images") of one saved model on the test split.

    test_features: read_features' tuple for features/test.h5 or None; test_rows: a callable giving
    (files, labels, paths) of the test manifest (read only when the images are needed).
    """
    from tlpipe.model.saved import head_submodel, load_model, model_info

    model = load_model(model_path)
    info = model_info(model)
    if list(info["class_names"]) != list(classes):
        raise ModelFileError(f"{model_path}: trained for classes {info['class_names']}, the test split has "
                             f"{list(classes)}; rerun the stage that writes it")
    attrs = test_features[3] if test_features is not None else None
    if can_use_features(info, attrs):
        x, y, paths, _ = test_features
        raw = head_submodel(model).predict(x, batch_size=256, verbose=0)
        return y, paths, raw, "features"
    files, labels, paths = test_rows()
    raw = _predict_images(model, files, int(info["image_size"]))
    return np.asarray(labels, dtype=np.int64), paths, raw, "images"


def evaluate_predictions(y, paths, raw, classes) -> dict:
    """Everything written for one model, from its predictions: metrics and the three CSV texts."""
    proba = to_probabilities(raw)
    metrics = classification_metrics(y, proba)
    fpr, tpr = roc_points(y, proba)
    header, rows = prediction_rows(paths, y, proba, classes)
    return {
        "metrics": metrics,
        "confusion": _csv_text(["actual", "predicted"], confusion_rows(y, proba.argmax(axis=1), classes)),
        "roc": _csv_text(["fpr", "tpr"], [[_num(a), _num(b)] for a, b in zip(fpr, tpr)]),
        "predictions": _csv_text(header, rows),
    }


def run_evaluate(features_dir, models_dir, split_dir, images_dir, metrics_out, plots_dir, predictions_dir,
                 model_names) -> dict:
    """evaluate stage: every model of `model_names` (params.evaluate.models) present in `models_dir`.

    A missing `head` model is an error, other missing models a warning. Writes metrics JSON
    {model: {accuracy, loss, precision, recall, f1, roc_auc, n}}, plots/confusion/<model>.csv,
    plots/roc/<model>.csv and predictions/<model>.csv; the three folders are rebuilt each run.
    """
    from tlpipe.features.extract import manifest_rows, read_class_names, read_features
    from tlpipe.train.loop import write_json

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
            print(f"warning: {path} not found, skipped (run its stage to evaluate it)", file=sys.stderr)

    dirs = {"confusion": _FreshDir(Path(plots_dir) / "confusion"), "roc": _FreshDir(Path(plots_dir) / "roc"),
            "predictions": _FreshDir(predictions_dir)}
    results = {}
    try:
        for name, path in present:
            y, paths, raw, route = predict_model(path, test_features, test_rows, classes)
            out = evaluate_predictions(y, paths, raw, classes)
            for key, d in dirs.items():
                if key != "roc" or out["roc"].count("\n") > 1:
                    d.write(f"{name}.csv", out[key])
            results[name] = out["metrics"]
            m = out["metrics"]
            print(f"{name}: accuracy {m['accuracy']:.4f}, loss {m['loss']:.4f} on {m['n']} test images "
                  f"(via {route})", file=sys.stderr)
    except BaseException:
        for d in dirs.values():
            d.discard()
        raise
    for d in dirs.values():
        d.commit()
    write_json(metrics_out, results)
    return results
