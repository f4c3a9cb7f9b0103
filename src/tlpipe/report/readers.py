"""The metrics files the report shows: the evaluate stage's scores and the training stages' metrics,
as {row: {column: number}} for `page.metrics_table`. A file that does not exist reads as nothing; one
that is damaged is a DataError naming it and the stage to rerun."""

from __future__ import annotations

import json
from pathlib import Path

from tlpipe.runtime.errors import DataError


def _read_json(path, stage: str):
    """The parsed file, or None when it does not exist."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); rerun the {stage} stage") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object; rerun the {stage} stage")
    return data


def _numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a JSON object, nested keys joined by '.' (as `dvc metrics show` names them)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def read_metrics(path) -> dict[str, dict[str, float]]:
    """The evaluate stage's scores file -> {model: {metric: number}} (per-class figures left out)."""
    data = _read_json(path, "evaluate") or {}
    return {str(model): _numbers({k: v for k, v in m.items() if k != "per_class"})
            for model, m in data.items() if isinstance(m, dict)}


def read_tta(path) -> dict[str, str]:
    """The evaluate stage's scores file -> {model: "mirror" | "none"}: how its test outputs were computed."""
    data = _read_json(path, "evaluate") or {}
    return {str(model): str(m["tta"]) for model, m in data.items() if isinstance(m, dict) and "tta" in m}


def read_per_class(path) -> dict[str, dict[str, float]]:
    """The evaluate stage's scores file -> {"model · class": {precision, recall, f1, n}}."""
    data = _read_json(path, "evaluate") or {}
    return {f"{model} · {cls}": _numbers(v) for model, m in data.items() if isinstance(m, dict)
            for cls, v in (m.get("per_class") or {}).items() if isinstance(v, dict)}


def read_training(paths) -> dict[str, dict[str, float]]:
    """{stage (the file's name): {best_epoch, val_accuracy, ...}} of the training stages' metrics
    files that exist, in the given order. A file holds its figures under the model's name
    ({"head": {...}}, see train.loop.metrics_of); that one level is unwrapped."""
    out = {}
    for path in paths:
        data = _read_json(path, Path(path).stem)
        if data is not None:
            if len(data) == 1 and isinstance(next(iter(data.values())), dict):
                data = next(iter(data.values()))
            out[Path(path).stem] = _numbers(data)
    return out


def read_lr_searches(paths) -> dict[str, list[dict]]:
    """{stage: the rows of its learning-rate sweep} for the training metrics files that hold one
    (`head.lr: auto`, train/lr_search.py), in the given order."""
    out = {}
    for path in paths:
        data = _read_json(path, Path(path).stem) or {}
        for figures in data.values():
            if isinstance(figures, dict) and isinstance(figures.get("lr_search"), list):
                out[Path(path).stem] = [r for r in figures["lr_search"] if isinstance(r, dict)]
    return out
