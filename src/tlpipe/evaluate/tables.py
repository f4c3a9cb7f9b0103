"""The CSV tables the evaluate stage writes per model: confusion and ROC plot data for `dvc plots`,
and per-image predictions. Pure: rows in, text out."""

from __future__ import annotations

from tlpipe.model.outputs import class_probabilities


def num(v: float) -> str:
    # Fixed precision: the CSVs stay byte-identical and readable.
    return f"{float(v):.6f}"


def confusion_rows(y_true, y_pred, class_names) -> list[list[str]]:
    """One [actual, predicted] row of class names per image (DVC's confusion template counts them)."""
    return [[class_names[int(t)], class_names[int(p)]] for t, p in zip(y_true, y_pred)]


def roc_rows(fpr, tpr) -> list[list[str]]:
    return [[num(a), num(b)] for a, b in zip(fpr, tpr)]


def prediction_rows(paths, y_true, proba, class_names) -> tuple[list[str], list[list]]:
    """(header, rows): path, true, predicted, p_<class> for every class, in the given order."""
    proba = class_probabilities(proba)
    header = ["path", "true", "predicted"] + [f"p_{c}" for c in class_names]
    rows = []
    for path, t, p in zip(paths, y_true, proba):
        rows.append([path, class_names[int(t)], class_names[int(p.argmax())]] + [num(v) for v in p])
    return header, rows
