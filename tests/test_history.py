"""The best epoch's rule (tlpipe.history.best_index), as training keeps it and the report marks it."""

from __future__ import annotations

import math

import pandas as pd

from tlpipe.history import best_index
from tlpipe.report.curves import best_epoch
from tlpipe.train.callbacks import should_stop
from tlpipe.train.loop import summarize

NAN = math.nan


def test_lowest_loss_earliest_on_ties():
    assert best_index([0.9, 0.5, 0.7, 0.5]) == 1
    assert best_index([]) is None


def test_a_diverged_epoch_is_never_best():
    # min() over raw floats would keep a leading NaN forever (every comparison with NaN is False).
    assert best_index([NAN, 0.8, 0.6, math.inf, 0.7]) == 2
    assert best_index([0.4, NAN]) == 0
    assert best_index([NAN, NAN]) == 0  # nothing finite: the earliest, as for a tie


def test_training_and_the_report_agree_with_a_nan_epoch():
    val = [NAN, 0.8, 0.6, NAN, 0.7]
    history = [{"val_loss": v, "val_accuracy": 0.5 + i / 10} for i, v in enumerate(val)]
    summary = summarize(history)
    assert summary["best_epoch"] == 3 and summary["best"]["val_accuracy"] == 0.7
    curves = {"loss": {"validation": pd.Series(val, index=range(1, 6))}}
    assert best_epoch(curves) == 3
    # Early stopping counts from that epoch: two epochs without a new best since epoch 3.
    assert should_stop(history, 2) and not should_stop(history, 3)
