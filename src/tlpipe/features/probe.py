"""backbone.layer / backbone.pooling `auto`: a linear probe picks the cut and the pooling on validation.

Each candidate (a layer, a pooling) turns the stored activations into one vector per image; a logistic
regression on standardised vectors is fitted on the training split and scored on the validation split
(never on test). The best validation accuracy wins; ties go to the lower validation log-loss, then to
the earlier candidate. A linear probe ranks how separable each layer's features are at a fraction of a
training run's cost; on small sets it is also a good predictor of which cut the dense head does best on.
"""

from __future__ import annotations

import numpy as np

# Rows the probe fits and scores on at most (evenly spaced, so the choice is deterministic): the ranking
# needs a few thousand images, and the memory it takes grows with them (flatten at block3_pool: 83k
# values per image).
MAX_TRAIN_ROWS = 4000
MAX_VALIDATION_ROWS = 2000
C = 0.01  # inverse L2 strength on standardised inputs, chosen on validation (docs/results.md)
MAX_ITER = 500


def pool(raw: np.ndarray, pooling: str) -> np.ndarray:
    """(N, H, W, C) activations -> (N, D) float32, as the model's Flatten / GlobalAverage / GlobalMax do.
    Averages are summed in float64, so the result does not depend on how numpy splits the sum."""
    if pooling == "flatten":
        return np.ascontiguousarray(raw.reshape(len(raw), -1), dtype=np.float32)
    if pooling == "avg":
        return raw.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)
    if pooling == "max":
        return raw.max(axis=(1, 2)).astype(np.float32)
    raise ValueError(f"unknown pooling {pooling!r}")


def spaced_rows(n: int, most: int) -> np.ndarray:
    """At most `most` row indices spread evenly over 0..n-1 (all of them when n <= most)."""
    return np.arange(n) if n <= most else np.linspace(0, n - 1, most).round().astype(np.int64)


def score(x_train, y_train, x_val, y_val, c: float = C) -> dict:
    """Fit the probe (strength `c`) on train, score it on validation: {"val_accuracy", "val_loss"}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import warnings

    from sklearn.exceptions import ConvergenceWarning

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=MAX_ITER))
    with warnings.catch_warnings():
        # A probe stopped at MAX_ITER still ranks the candidates; the warning would only alarm users.
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(x_train, y_train)
    proba = probe.predict_proba(x_val)
    labels = probe.classes_
    accuracy = float(np.mean(labels[proba.argmax(axis=1)] == y_val))
    loss = float(log_loss(y_val, proba, labels=labels))
    return {"val_accuracy": round(accuracy, 6), "val_loss": round(loss, 6)}


def best(rows: list[dict]) -> dict:
    """The winning row: highest val_accuracy, then lowest val_loss, then the earliest."""
    return min(enumerate(rows), key=lambda ir: (-ir[1]["val_accuracy"], ir[1]["val_loss"], ir[0]))[1]


def run_probe(candidates, train_raw, validation_raw, y_train, y_val, progress=None) -> list[dict]:
    """One row per candidate (layer, pooling): {"layer", "pooling", "dim", "val_accuracy", "val_loss"}.

    `train_raw(layer)`, `validation_raw(layer)`: that layer's (N, H, W, C) activations of the probe's rows.
    `progress(text)`: told which candidate is being fitted."""
    rows = []
    for layer in dict.fromkeys(layer for layer, _ in candidates):
        raw_t, raw_v = train_raw(layer), validation_raw(layer)
        for pooling in (p for lyr, p in candidates if lyr == layer):
            if progress:
                progress(f"{layer} {pooling}")
            xt, xv = pool(raw_t, pooling), pool(raw_v, pooling)
            rows.append({"layer": layer, "pooling": pooling, "dim": int(xt.shape[1]),
                         **score(xt, y_train, xv, y_val)})
    order = {c: i for i, c in enumerate(candidates)}
    return sorted(rows, key=lambda r: order[(r["layer"], r["pooling"])])
