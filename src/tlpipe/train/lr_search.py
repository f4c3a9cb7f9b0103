"""The head's learning rate from the data (`head.lr: auto`): a short sweep on the stored features.

The head trains on features the extract stage stored, in seconds per run, so the stage can afford to
train it once per candidate rate, exactly as it will train it (same model, seed, epochs, batches and
keep-best rule), and keep the rate whose best epoch has the lowest validation loss (the rule that
picks the kept epoch; ties: the smaller rate). A fixed rate tuned on one data set starves another:
2e-5 over 30 epochs of a few hundred photos leaves the head near chance (issue 21's 5-class case).
Validation only: the test split is never read. What each candidate scored goes into the stage's
metrics file, so `dvc exp show` and the report show how the rate was chosen.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import replace
from pathlib import Path

# Half-decade steps over the range where a dense head on standardised conv features trains at all.
CANDIDATES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)


def sweep(make_model, data, run, candidates=None) -> list[dict]:
    """Train `make_model(lr)` (a compiled head) on `data` under `run` (a TrainSettings) at each rate of
    `candidates` (None: CANDIDATES): one row per rate with the best epoch (lowest val loss) and its
    val loss and accuracy."""
    from tlpipe.train.loop import fit

    rows = []
    for lr in CANDIDATES if candidates is None else candidates:
        with tempfile.TemporaryDirectory() as tmp:  # each try's dvclive files are thrown away
            result = fit(make_model(lr), data, replace(run, lr=float(lr), resume=False, patience=None),
                         live_dir=Path(tmp) / "live", verbose=False)
        best = result["best_epoch"]
        row = result["history"][best - 1]
        rows.append({"lr": float(lr), "best_epoch": int(best), "val_loss": float(row["val_loss"]),
                     "val_accuracy": float(row["val_accuracy"])})
    return rows


def choose(rows: list[dict]) -> float:
    """The rate whose best epoch has the lowest validation loss (NaN never; ties: the smaller rate)."""
    finite = [r for r in rows if math.isfinite(r["val_loss"])]
    if not finite:
        raise ValueError("every candidate learning rate diverged (NaN validation loss)")
    return min(finite, key=lambda r: (r["val_loss"], r["lr"]))["lr"]
