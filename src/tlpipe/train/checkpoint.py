"""The training checkpoint: what `train.resume: true` continues from.

After each epoch the model's variables (weights and RNG layer states, which Keras' own `.keras` files
do not keep), the optimizer's variables, the history so far and, with keep="best", the best epoch's
variables (in the same .npz as the last epoch's, so one atomic write) go to the checkpoint folder next to
the model (`checkpoint_dir_for`). A checkpoint resumes only if its fingerprint (`fingerprint`) equals the
run's. Ours, not keras.callbacks.BackupAndRestore: each epoch is its own model.fit call (its data
comes from data.epoch(e)), and that callback neither writes atomically nor checks a fingerprint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from tlpipe import atomic
from tlpipe.history import best_epoch
from tlpipe.runtime.log import log

CKPT_FORMAT = 2  # 2: the best epoch's variables ride in the checkpoint (b0, b1, ...)


def checkpoint_dir_for(model_path) -> Path:
    """Checkpoint folder next to the model: models/head.keras -> models/.head.work/."""
    p = Path(model_path)
    return p.parent / f".{p.stem}.work"


def fingerprint(model, settings, data_fingerprint: dict) -> dict:
    """What must be unchanged for a checkpoint to continue this run (epochs may grow). keep: a
    keep="last" checkpoint lacks the best weights; patience: a smaller one may have stopped earlier."""
    from tlpipe.runtime.threads import INTRA_OP_THREADS

    shapes = [list(map(int, v.shape)) for v in model.variables]
    patience = settings.patience
    return {"format": CKPT_FORMAT, "intra_op_threads": INTRA_OP_THREADS, "seed": int(settings.seed),
            "batch_size": int(settings.batch_size), "variables": shapes,
            "extra": atomic.rounded({**settings.run_fingerprint(), **data_fingerprint}), "keep": settings.keep,
            "patience": None if patience is None else int(patience)}


def snapshot(model) -> list[np.ndarray]:
    """A copy of the model's variables."""
    return [np.array(v.numpy(), copy=True) for v in model.variables]


def _atomic_write_bytes(path: Path, write: Callable) -> None:
    with atomic.target(path, fsync=True) as tmp, open(tmp, "wb") as fh:
        write(fh)


def save_checkpoint(checkpoint_dir: Path, model, epoch: int, history: list[dict], fingerprint: dict,
                    best: list[np.ndarray] | None = None) -> None:
    """Write epoch `epoch` (1-based count of finished epochs): arrays first, then state.json points at them.

    best: the best epoch's model variables (keep="best"), stored unless that epoch is `epoch` itself
    (then they are the model's own)."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}.npz"
    arrays = {f"m{i}": np.asarray(v.numpy()) for i, v in enumerate(model.variables)}
    arrays.update({f"o{i}": np.asarray(v.numpy()) for i, v in enumerate(model.optimizer.variables)})
    if best is not None and best_epoch(history) != epoch:
        arrays.update({f"b{i}": a for i, a in enumerate(best)})
    _atomic_write_bytes(checkpoint_dir / name, lambda fh: np.savez(fh, **arrays))
    state = {"epoch": epoch, "file": name, "history": history, "fingerprint": fingerprint}
    _atomic_write_bytes(checkpoint_dir / "state.json", lambda fh: fh.write(json.dumps(state, sort_keys=True).encode()))
    for old in checkpoint_dir.glob("epoch-*.npz"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(checkpoint_dir: Path, model, fingerprint: dict,
                    max_epoch: int) -> tuple[int, list[dict], list[np.ndarray]] | None:
    """Restore the last finished epoch into `model` -> (epoch, history, the best epoch's variables);
    None (with a warning) if absent or not for this run."""
    state_file = checkpoint_dir / "state.json"
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
        with np.load(checkpoint_dir / state["file"]) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, KeyError) as exc:
        log.warning(f"{checkpoint_dir}: unreadable checkpoint ({exc}); starting from epoch 1")
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning(f"{checkpoint_dir}: checkpoint was made with other settings; starting from epoch 1")
        return None
    if int(state["epoch"]) > int(max_epoch):
        log.warning(f"{checkpoint_dir}: checkpoint is past epoch {max_epoch}; starting from epoch 1")
        return None
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    opt_vars = model.optimizer.variables
    if sum(k.startswith("o") for k in arrays) != len(opt_vars):
        log.warning(f"{checkpoint_dir}: checkpoint optimizer state does not fit; starting from epoch 1")
        return None
    n_vars = len(model.variables)
    has_best = any(k.startswith("b") for k in arrays)
    if has_best and sum(k.startswith("b") for k in arrays) != n_vars:
        log.warning(f"{checkpoint_dir}: checkpoint best-epoch state does not fit; starting from epoch 1")
        return None
    for i, v in enumerate(model.variables):
        v.assign(arrays[f"m{i}"])
    for i, v in enumerate(opt_vars):
        v.assign(arrays[f"o{i}"])
    best = [arrays[f"b{i}" if has_best else f"m{i}"] for i in range(n_vars)]
    return int(state["epoch"]), list(state["history"]), best
