"""Test-split scores of one model from (labels, class probabilities): pure functions, no I/O.

Binary: positive class = index 1; precision/recall/F1/ROC AUC of that class; ROC curve of P(class 1).
More classes: macro averages, ROC AUC one-vs-rest macro; the ROC curve is the micro-average
(every (image, class) pair as one binary decision).
"""

from __future__ import annotations

import numpy as np

from tlpipe.runtime.errors import DataError
from tlpipe.model.outputs import class_probabilities

EPS = 1e-7  # Keras' epsilon: log loss clips probabilities the same way training did
# What `dvc exp show` compares per model (metrics/evaluate.json); the rest of `scores` goes to the report.
HEADLINE = ("accuracy", "roc_auc", "loss")


def log_loss(y_true, proba) -> float:
    """Mean negative log-probability of the true class (clipped at EPS)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    p = np.clip(np.asarray(proba, dtype=np.float64)[np.arange(len(y_true)), y_true], EPS, 1.0)
    return float(-np.mean(np.log(p)))


def _check(y_true, proba) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = class_probabilities(proba)
    n, k = proba.shape
    if len(y_true) != n:
        raise ValueError(f"{len(y_true)} labels for {n} predictions")
    if n == 0:
        raise DataError("the test split is empty: nothing to evaluate; give data.split a test share")
    if y_true.min() < 0 or y_true.max() >= k:
        raise DataError(f"labels outside 0..{k - 1} for a {k}-class model")
    return y_true, proba


def scores(y_true, proba, class_names=None) -> dict:
    """accuracy, loss, precision, recall, f1, roc_auc (None when a class is absent), n, and
    per_class {name: {precision, recall, f1, n}} (names default to the class indices)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

    y_true, proba = _check(y_true, proba)
    n, k = proba.shape
    names = [str(c) for c in (class_names if class_names is not None else range(k))]
    y_pred = proba.argmax(axis=1)
    labels = list(range(k))
    binary = k == 2
    avg = {"average": "binary", "pos_label": 1} if binary else {"average": "macro"}
    prec, rec, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0, **avg)
    each = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0, average=None)
    present = np.unique(y_true)
    auc = None
    if binary and len(present) == 2:
        auc = float(roc_auc_score(y_true, proba[:, 1]))
    elif not binary and len(present) == k:
        auc = float(roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=labels))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "loss": log_loss(y_true, proba),
        "precision": float(prec),
        "recall": float(rec),
        "f1": float(f1),
        "roc_auc": auc,
        "n": int(n),
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "n": int(s)}
                      for name, p, r, f, s in zip(names, *each)},
    }


def headline(s: dict) -> dict:
    """The figures `dvc exp show` compares, from `scores`."""
    return {k: s[k] for k in HEADLINE}


def roc_points(y_true, proba) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr): of P(class 1) for two classes, the micro-average for more. Empty if undefined."""
    from sklearn.metrics import roc_curve

    y_true = np.asarray(y_true, dtype=np.int64)
    proba = class_probabilities(proba)
    if proba.shape[1] == 2:
        truth, score = (y_true == 1).astype(int), proba[:, 1]
    else:
        truth = np.eye(proba.shape[1], dtype=int)[y_true].ravel()
        score = proba.ravel()
    if len(np.unique(truth)) < 2:  # one class only: no curve
        return np.zeros(0), np.zeros(0)
    fpr, tpr, _ = roc_curve(truth, score)
    return fpr, tpr
