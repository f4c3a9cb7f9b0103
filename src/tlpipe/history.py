"""The rule for a training history's best epoch, in one place: the training loop keeps that epoch's
weights (train.keep: best) and the report marks it on the curves. A leaf module, so the report reads
it without importing training code."""

from __future__ import annotations

import math
from collections.abc import Sequence


def best_index(val_losses: Sequence[float]) -> int | None:
    """The index of the lowest validation loss, the earliest on ties; None for no epochs. A NaN or
    infinite loss (a diverged epoch) is never best while any epoch has a finite one."""
    if not len(val_losses):
        return None

    def key(i: int):
        v = float(val_losses[i])
        return (not math.isfinite(v), v if math.isfinite(v) else 0.0, i)

    return min(range(len(val_losses)), key=key)


def best_epoch(history: Sequence[dict]) -> int | None:
    """The best epoch (1-based) of a training history (rows with `val_loss`); None for no epochs."""
    return best_index([row["val_loss"] for row in history]) + 1 if history else None
