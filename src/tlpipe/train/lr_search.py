"""The head's learning rate from the data (`head.lr: auto`): a short sweep on the stored features.

The head trains on features the extract stage stored, in seconds per run, so the stage can afford to
train it once per candidate rate, as a stage run (same model, seed, epochs, batches, keep-best rule and
patience), and keep the rate whose best epoch has the lowest validation loss (the rule that picks the
kept epoch; ties: the smaller rate), with the model that run trained: the chosen rate is not trained
again. A fixed rate tuned on one data set starves another:
2e-5 over 30 epochs of a few hundred photos leaves the head near chance (issue 21's 5-class case).
Validation only: the test split is never read. What each candidate scored goes into the stage's
metrics file, so `dvc exp show` and the report show how the rate was chosen.
"""

from __future__ import annotations

import math
from dataclasses import replace

# Half-decade steps over the range where a dense head on standardised conv features trains at all.
CANDIDATES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)


def sweep(make_model, data, run, candidates=None) -> tuple[list[dict], tuple]:
    """Train `make_model(lr)` (a compiled head) on `data` under `run` (a TrainSettings; no checkpoint,
    no dvclive) at each rate of `candidates` (None: CANDIDATES). Returns (rows, (lr, model, result)):
    one row per rate with the best epoch (lowest val loss) and its val loss and accuracy, and the
    chosen rate with its trained model and fit's result."""
    from tlpipe.train.loop import fit

    rows, trained = [], {}
    for lr in CANDIDATES if candidates is None else candidates:
        model = make_model(lr)
        result = fit(model, data, replace(run, lr=float(lr)), live_dir=None, verbose=False)
        best = result["best_epoch"]
        row = result["history"][best - 1]
        rows.append({"lr": float(lr), "best_epoch": int(best), "val_loss": float(row["val_loss"]),
                     "val_accuracy": float(row["val_accuracy"])})
        trained[float(lr)] = (model, result)
        if any(math.isfinite(r["val_loss"]) for r in rows):  # keep only the leader's model in memory
            leader = choose(rows)
            trained = {leader: trained[leader]}
    lr = choose(rows)
    return rows, (lr, *trained[lr])


def choose(rows: list[dict]) -> float:
    """The rate whose best epoch has the lowest validation loss (NaN never; ties: the smaller rate)."""
    finite = [r for r in rows if math.isfinite(r["val_loss"])]
    if not finite:
        raise ValueError("every candidate learning rate diverged (NaN validation loss)")
    return min(finite, key=lambda r: (r["val_loss"], r["lr"]))["lr"]
