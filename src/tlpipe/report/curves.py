"""Training curves (train vs validation, per epoch) from dvclive folders, one PNG per stage.

dvclive writes each logged metric to `<live>/<stage>/plots/metrics/<name>.tsv` with columns
`step` (the epoch, from 1: training sets dvclive's step to it) and the metric. Names vary with how training logs them ("train/loss",
"val/loss", or Keras-style "loss", "val_loss"), so we read whatever exists and group by metric.
Each panel marks the best epoch as training defines it (tlpipe.history.best_index: lowest validation
loss, earliest on ties, never a NaN; the metrics files' best_epoch), the epoch `train.keep: best` saves.
Fine-tuning also logs its start model's validation figures at step 0: where no epoch beats it, the
best epoch is 0, the start model saved unchanged.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from tlpipe.runtime.errors import DataError
from tlpipe.history import best_index
from tlpipe.report.plotting import new_figure, save_figure

VALIDATION = {"val", "validation", "eval", "valid"}
TRAIN = {"train", "training"}
FIRST = ["loss", "accuracy", "acc"]


def split_metric_name(name: str) -> tuple[str, str]:
    """'train/loss' -> ('loss', 'train'); 'val_accuracy' -> ('accuracy', 'validation')."""
    parts = name.split("/")
    split, base = "train", parts[-1]
    if len(parts) > 1 and parts[0] in VALIDATION:
        split = "validation"
    elif len(parts) > 1 and parts[0] not in TRAIN:
        base = name  # an unknown group: keep the full name as the metric
    for prefix in ("val_", "validation_"):
        if base.startswith(prefix):
            split, base = "validation", base[len(prefix):]
    return base, split


def read_stage_metrics(stage_dir) -> dict[str, dict[str, pd.Series]]:
    """{metric: {split: Series(value, index=epoch 1..)}} from one dvclive stage folder."""
    root = Path(stage_dir) / "plots" / "metrics"
    metrics: dict[str, dict[str, pd.Series]] = {}
    for tsv in sorted(root.rglob("*.tsv")):
        rel = tsv.relative_to(root).with_suffix("").as_posix()
        try:
            df = pd.read_csv(tsv, sep="\t")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise DataError(f"{tsv}: not a dvclive metric file ({e}); delete it and rerun training") from None
        value_cols = [c for c in df.columns if c not in ("step", "timestamp")]
        if "step" not in df.columns or not value_cols or df.empty:
            continue  # nothing plottable; an empty file is a run interrupted before its first epoch
        metric, split = split_metric_name(rel)
        series = pd.Series(df[value_cols[-1]].to_numpy(float), index=df["step"].to_numpy())
        metrics.setdefault(metric, {})[split] = series
    return metrics


def metric_order(names) -> list[str]:
    return sorted(names, key=lambda n: (FIRST.index(n) if n in FIRST else len(FIRST), n))


def best_epoch(metrics: dict[str, dict[str, pd.Series]]) -> int | None:
    """The epoch of lowest validation loss (0: the start model, where logged), the earliest on ties;
    None without that curve."""
    s = metrics.get("loss", {}).get("validation")
    if s is None or s.empty:
        return None
    return int(s.index.to_numpy()[best_index(s.to_numpy())])


def plot_stage(metrics: dict[str, dict[str, pd.Series]], title: str):
    """A figure with one panel per metric, train and validation curves in each, and a dashed line at
    the best epoch (best_epoch); one legend under the panels (inside them it hid the curves)."""
    names = metric_order(metrics)
    best = best_epoch(metrics)
    fig = new_figure(4.2 * len(names), 3.5)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    styles = {"train": dict(color="#1f77b4", marker="o"), "validation": dict(color="#d62728", marker="s")}
    for ax, name in zip(axes, names):
        for split in ("train", "validation"):
            s = metrics[name].get(split)
            if s is not None:
                ax.plot(s.index, s.to_numpy(), label=split, markersize=3, linewidth=1.5, **styles[split])
        if best is not None:
            ax.axvline(best, color="#2ca02c", linestyle="--", linewidth=1.2,
                       label="best: epoch 0, the start model (lowest val loss)" if best == 0
                       else f"best epoch {best} (lowest val loss)")
        ax.set_title(f"{title}: {name}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    entries = {}  # label -> handle, in the panels' order (a panel may lack the train curve)
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    fig.legend(list(entries.values()), list(entries), loc="outside lower center", ncol=len(entries), frameon=False)
    return fig


def save_curves(live_dir, out_dir, order=(), prefix: str = "curves") -> list[dict]:
    """One PNG per dvclive stage folder that has metrics; records: stage, metrics, epochs, best_epoch
    (None without a validation loss), file.

    Stages named in `order` (pipeline order, e.g. head, head_aug, finetuned) come first.
    """
    live_dir = Path(live_dir)
    records = []
    found = [p.parent.parent for p in live_dir.glob("*/plots/metrics")] if live_dir.is_dir() else []
    order = list(order)
    stages = sorted(found, key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))
    for stage_dir in stages:
        metrics = read_stage_metrics(stage_dir)
        if not metrics:
            continue
        file = f"{prefix}_{stage_dir.name}.png"
        save_figure(plot_stage(metrics, stage_dir.name), Path(out_dir) / file)
        epochs = max(int(s.index.max()) for m in metrics.values() for s in m.values())  # trained: step 0 is the start
        records.append({"stage": stage_dir.name, "metrics": metric_order(metrics), "epochs": epochs,
                        "best_epoch": best_epoch(metrics), "file": file})
    return records
