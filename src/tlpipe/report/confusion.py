"""Confusion matrices for the report: counted from the evaluate stage's plot CSVs (`actual,predicted`,
one row per test image) and drawn as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tlpipe.runtime.errors import DataError
from tlpipe.report.plotting import new_figure, save_figure


def confusion_counts(csv, class_names: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """(labels, counts[actual, predicted]) from a CSV with one row per sample: actual,predicted."""
    csv = Path(csv)
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{csv}: not a confusion CSV ({e}); rerun the evaluate stage") from None
    if not {"actual", "predicted"} <= set(df.columns):
        raise DataError(f"{csv}: needs columns actual,predicted; has {list(df.columns)}")
    from sklearn.metrics import confusion_matrix

    seen = sorted(set(df["actual"]) | set(df["predicted"]))
    labels = list(class_names or []) + [x for x in seen if x not in (class_names or [])]
    if df.empty:  # sklearn refuses no samples; no test images is a matrix of zeros
        return labels, np.zeros((len(labels), len(labels)), dtype=np.int64)
    counts = confusion_matrix(df["actual"], df["predicted"], labels=labels).astype(np.int64)
    return labels, counts


def save_confusion_png(labels: list[str], counts: np.ndarray, title: str, path) -> Path:
    n = len(labels)
    side = max(3.2, 0.9 * n + 1.8)
    fig = new_figure(side + 0.8, side)
    ax = fig.subplots()
    im = ax.imshow(counts, cmap="Blues", vmin=0)
    ax.set_xticks(range(n), labels, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    top = counts.max() if counts.size else 0
    for (i, j), v in np.ndenumerate(counts):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return save_figure(fig, path)
