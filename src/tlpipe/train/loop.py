"""Deterministic, resumable training loop with per-epoch dvclive metrics.

Determinism: `fit` seeds Python/NumPy/TF (`keras.utils.set_random_seed`), turns on TF op
determinism, re-seeds every RNG layer of the model (dropout, augmentation) from `seed`, and feeds
array data in a per-epoch order drawn from (seed, epoch) alone. So the same inputs give the same
history, and an epoch's batches do not depend on whether earlier epochs ran in this process.

Resume: after each epoch the model's variables (weights and RNG layer states, which Keras' own
`.keras` files do not keep), the optimizer's variables and the history so far go to `work_dir`.
`resume=True` restores the last finished epoch and continues; the result is bit-for-bit that of an
uninterrupted run on the same machine, as long as `data.epoch(e)` depends on e alone (every source in
tlpipe.train.data does; a tf.data.Dataset whose shuffling depends on how often it was iterated does not).

Best epoch: the epoch of lowest validation loss, the earliest on ties, a NaN loss never best
(`summarize`, by tlpipe.history.best_index). With keep="best"
(train.keep) the model ends with that epoch's variables: `fit` holds a copy of them and the checkpoint
holds them too (in the same .npz as the last epoch's, so one atomic write), so a resumed run keeps the
same epoch. patience=N (train.patience) stops after N epochs in a row without a new best; the check
runs before each epoch from the history alone, so a resumed run stops where an uninterrupted one does.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from tlpipe import atomic
from tlpipe.choices import TRAIN_KEEPS
from tlpipe.errors import ConfigError
from tlpipe.history import best_index

METRICS = ("loss", "accuracy")
CKPT_FORMAT = 2  # 2: the best epoch's variables ride in the checkpoint (b0, b1, ...)


def set_determinism(seed: int) -> None:
    """Seed every RNG Keras/TF/NumPy use and make TF kernels deterministic (and their thread pool the
    fixed size of tlpipe.threads, where TensorFlow has not started yet)."""
    import keras
    import tensorflow as tf

    from tlpipe import threads

    threads.ensure()
    keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()


def _seed_states(model) -> list:
    # Keras keeps a layer's RNG position in a non-trainable "seed_generator_state" variable.
    return [v for v in model.variables if v.name.endswith("seed_generator_state")]


def reseed_layers(model, seed: int) -> None:
    """Give each RNG layer a state derived from (seed, its index), whatever built the model."""
    for i, var in enumerate(_seed_states(model)):
        derived = int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0]) & 0x7FFFFFFF
        var.assign(np.array([derived, 0], dtype=var.dtype))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a function of (seed, epoch) only, so resuming repeats it."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def summarize(history: list[dict]) -> dict:
    """Final metrics: epochs run, the best epoch (lowest val loss, earliest on ties) and the last one."""
    if not history:
        return {"epochs": 0}
    best_i = best_index([row["val_loss"] for row in history])
    return {
        "epochs": len(history),
        "best_epoch": best_i + 1,
        "best": dict(history[best_i]),
        "last": dict(history[-1]),
    }


def best_epoch_of(history: list[dict]) -> int | None:
    """The best epoch (1-based): lowest val loss, earliest on ties; None before the first epoch."""
    return summarize(history).get("best_epoch")


def should_stop(history: list[dict], patience: int | None) -> bool:
    """Early stopping: `patience` epochs in a row have passed without a new best (None: never)."""
    if not patience or not history:
        return False
    return len(history) - best_epoch_of(history) >= int(patience)


def _atomic_write_bytes(path: Path, write: Callable) -> None:
    with atomic.target(path, fsync=True) as tmp, open(tmp, "wb") as fh:
        write(fh)


def _fingerprint(model, seed: int, batch_size: int, extra: dict | None, keep: str = "last",
                 patience: int | None = None) -> dict:
    # What must be unchanged for a checkpoint to continue this run (epochs may grow). keep: a
    # keep="last" checkpoint lacks the best weights; patience: a smaller one may have stopped earlier.
    from tlpipe.threads import INTRA_OP_THREADS

    shapes = [list(map(int, v.shape)) for v in model.variables]
    return {"format": CKPT_FORMAT, "intra_op_threads": INTRA_OP_THREADS, "seed": int(seed), "batch_size": int(batch_size),
            "variables": shapes, "extra": extra or {}, "keep": keep,
            "patience": None if patience is None else int(patience)}


def _snapshot(model) -> list[np.ndarray]:
    return [np.array(v.numpy(), copy=True) for v in model.variables]


def save_checkpoint(work_dir: Path, model, epoch: int, history: list[dict], fingerprint: dict,
                    best: list[np.ndarray] | None = None) -> None:
    """Write epoch `epoch` (1-based count of finished epochs): arrays first, then state.json points at them.

    best: the best epoch's model variables (keep="best"), stored unless that epoch is `epoch` itself
    (then they are the model's own)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}.npz"
    arrays = {f"m{i}": np.asarray(v.numpy()) for i, v in enumerate(model.variables)}
    arrays.update({f"o{i}": np.asarray(v.numpy()) for i, v in enumerate(model.optimizer.variables)})
    if best is not None and best_epoch_of(history) != epoch:
        arrays.update({f"b{i}": a for i, a in enumerate(best)})
    _atomic_write_bytes(work_dir / name, lambda fh: np.savez(fh, **arrays))
    state = {"epoch": epoch, "file": name, "history": history, "fingerprint": fingerprint}
    _atomic_write_bytes(work_dir / "state.json", lambda fh: fh.write(json.dumps(state, sort_keys=True).encode()))
    for old in work_dir.glob("epoch-*.npz"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(work_dir: Path, model, fingerprint: dict,
                    max_epoch: int) -> tuple[int, list[dict], list[np.ndarray]] | None:
    """Restore the last finished epoch into `model` -> (epoch, history, the best epoch's variables);
    None (with a warning) if absent or not for this run."""
    state_file = work_dir / "state.json"
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
        with np.load(work_dir / state["file"]) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, KeyError) as exc:
        warnings.warn(f"{work_dir}: unreadable checkpoint ({exc}); starting from epoch 1", stacklevel=2)
        return None
    if state.get("fingerprint") != fingerprint:
        warnings.warn(f"{work_dir}: checkpoint was made with other settings; starting from epoch 1", stacklevel=2)
        return None
    if int(state["epoch"]) > int(max_epoch):
        warnings.warn(f"{work_dir}: checkpoint is past epoch {max_epoch}; starting from epoch 1", stacklevel=2)
        return None
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    opt_vars = model.optimizer.variables
    if sum(k.startswith("o") for k in arrays) != len(opt_vars):
        warnings.warn(f"{work_dir}: checkpoint optimizer state does not fit; starting from epoch 1", stacklevel=2)
        return None
    n_vars = len(model.variables)
    has_best = any(k.startswith("b") for k in arrays)
    if has_best and sum(k.startswith("b") for k in arrays) != n_vars:
        warnings.warn(f"{work_dir}: checkpoint best-epoch state does not fit; starting from epoch 1", stacklevel=2)
        return None
    for i, v in enumerate(model.variables):
        v.assign(arrays[f"m{i}"])
    for i, v in enumerate(opt_vars):
        v.assign(arrays[f"o{i}"])
    best = [arrays[f"b{i}" if has_best else f"m{i}"] for i in range(n_vars)]
    return int(state["epoch"]), list(state["history"]), best


def _open_live(live_dir):
    from dvclive import Live

    # No dvc.yaml, no report, no experiment commit, no git: the pipeline's dvc.yaml owns all that.
    return Live(dir=str(live_dir), resume=False, report=None, save_dvc_exp=False, dvcyaml=None,
                monitor_system=False)


def _log_epoch(live, row: dict) -> None:
    for key in ("loss", "accuracy"):
        live.log_metric(f"train/{key}", row[f"train_{key}"])
        live.log_metric(f"val/{key}", row[f"val_{key}"])
    live.next_step()


def _batch_bar(total: int | None, desc: str):
    # Ours, not tqdm.keras.TqdmCallback: that one opens an epoch bar of its own in every model.fit call
    # (one per epoch here, beside the run's epoch bar) and counts batches as scaled floats ("1.00/4.00").
    import keras
    from tqdm.auto import tqdm

    class BatchBar(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.bar = tqdm(total=total, desc=desc, unit="batch", leave=False, file=sys.stderr)

        def on_train_batch_end(self, batch, logs=None):
            self.bar.update(1)

        def on_train_end(self, logs=None):
            self.bar.close()

    return BatchBar()


def fit(model, data, epochs: int, batch_size: int, seed: int, live_dir, work_dir=None, resume: bool = False,
        fingerprint: dict | None = None, keep_work: bool = False,
        on_epoch_end: Callable[[int, dict], None] | None = None, keep: str = "best",
        patience: int | None = None, learning_rates: list[float] | None = None) -> dict:
    """Train a compiled model for `epochs` on `data` (a tlpipe.train.data.TrainingData); log per-epoch
    metrics to dvclive at `live_dir`.

    data.epoch(e): (x, y) arrays (shuffled here by `epoch_order`) or a batched tf.data.Dataset;
    data.validation(): (x, y) arrays or a batched Dataset.
    work_dir: checkpoint folder (None: no checkpoints). resume=False removes stale checkpoints.
    fingerprint: the caller's settings a checkpoint must match (e.g. lr), besides data.fingerprint.
    on_epoch_end(epoch, row): called after each epoch is logged and checkpointed (1-based epoch).
    keep: "best" ends with the variables of the best epoch (summarize's), "last" with the last epoch's.
    patience: stop after that many epochs without a new best (None: run all `epochs`).
    learning_rates: the optimizer's learning rate per epoch (compile.learning_rates; None: as compiled).
    Returns `summarize(history)` plus "history" (a list of per-epoch dicts) and "kept_epoch" (the
    epoch whose variables the model holds).
    """
    from tqdm.auto import tqdm

    if int(epochs) < 1:
        raise ConfigError(f"epochs must be a positive integer, got {epochs}")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
    if getattr(model, "optimizer", None) is None or not getattr(model, "compiled", True):
        raise ConfigError("fit() needs a compiled model (tlpipe.train.compile.compile_classifier)")
    if keep not in TRAIN_KEEPS:
        raise ConfigError(f"train.keep: must be one of {', '.join(TRAIN_KEEPS)}, got {keep!r}")
    if patience is not None and (isinstance(patience, bool) or int(patience) != patience or int(patience) < 1):
        raise ConfigError(f"train.patience: must be a positive integer or null, got {patience!r}")
    if learning_rates is not None and len(learning_rates) != int(epochs):
        raise ValueError(f"learning_rates: {len(learning_rates)} rates for {epochs} epochs")
    set_determinism(seed)
    reseed_layers(model, seed)

    # Ours, not keras.callbacks.BackupAndRestore: each epoch is its own model.fit call (its data comes
    # from data.epoch(e)), and that callback neither writes atomically nor checks a fingerprint.
    work = Path(work_dir) if work_dir is not None else None
    finger = _fingerprint(model, seed, batch_size, atomic.rounded({**(fingerprint or {}), **data.fingerprint}),
                          keep, patience)
    history: list[dict] = []
    best: list[np.ndarray] | None = None  # keep="best": the best epoch's variables so far
    if work is not None and not resume and work.exists():
        shutil.rmtree(work)
    if work is not None and resume:
        restored = load_checkpoint(work, model, finger, int(epochs))
        if restored is not None:
            history = restored[1][: restored[0]]
            best = restored[2] if keep == "best" else None
            print(f"resuming after epoch {restored[0]} from {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    start = len(history)

    xv = data.validation()
    val_kwargs = {"validation_data": xv}
    if isinstance(xv, tuple):
        val_kwargs["validation_batch_size"] = int(batch_size)
    # Ours, not dvclive.keras.DVCLiveCallback: that one names validation metrics eval/* (dvc.yaml plots
    # read val/*), ends the Live at each model.fit's end, and cannot replay a resumed run's epochs.
    live = _open_live(live_dir)
    for row in history:  # rebuild dvclive's files so they equal an uninterrupted run's
        _log_epoch(live, row)
    bar = tqdm(total=int(epochs), initial=start, desc="epochs", unit="epoch", file=sys.stderr)
    try:
        for epoch in range(start, int(epochs)):
            if should_stop(history, patience):
                bar.write(f"early stop after epoch {len(history)}: no lower val_loss in {patience} epochs "
                          f"(best epoch {best_epoch_of(history)})", file=sys.stderr)
                break
            if learning_rates is not None:
                model.optimizer.learning_rate = learning_rates[epoch]
            train = data.epoch(epoch)
            kwargs = {}
            if isinstance(train, tuple):
                x, y = train
                order = epoch_order(len(y), seed, epoch)
                data_args = (x[order], y[order])
                kwargs.update(batch_size=int(batch_size), shuffle=False)
                steps = -(-len(y) // int(batch_size))
            else:
                data_args, steps = (train,), None
            hist = model.fit(*data_args, epochs=1, verbose=0, callbacks=[_batch_bar(steps, f"epoch {epoch + 1}")],
                             **kwargs, **val_kwargs)
            h = hist.history
            row = {"epoch": epoch + 1}
            for key in METRICS:
                row[f"train_{key}"] = float(h[key][-1])
                row[f"val_{key}"] = float(h[f"val_{key}"][-1])
            history.append(row)
            if keep == "best" and best_epoch_of(history) == epoch + 1:
                best = _snapshot(model)
            if work is not None:
                save_checkpoint(work, model, epoch + 1, history, finger, best)
            _log_epoch(live, row)
            bar.update(1)
            bar.write(f"epoch {epoch + 1}/{epochs}: loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
                      f" - val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f}", file=sys.stderr)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, row)
    finally:
        bar.close()
        live.end()
    kept = len(history)
    if keep == "best" and history:
        kept = best_epoch_of(history)
        if kept != len(history):
            for v, a in zip(model.variables, best):
                v.assign(a)
            print(f"kept epoch {kept} of {len(history)} (lowest val_loss; train.keep: best)", file=sys.stderr)
    if work is not None and not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    result = summarize(history)
    result["history"] = history
    result["kept_epoch"] = kept
    return result


def metrics_of(summary: dict, model_path) -> dict:
    """What a training stage's metrics file holds: the best epoch (lowest val loss) and its val accuracy,
    under the model's name (the model file's stem, as in evaluate.json), so that `dvc exp show` names the
    columns head.best_epoch, finetuned.val_accuracy... rather than by file path. With train.keep: best
    (the default) the saved model is that epoch's, so these figures describe it; with keep: last it is
    the last epoch's. The per-epoch history is in dvclive's files."""
    return {Path(model_path).stem: {"best_epoch": int(summary["best_epoch"]),
                                    "val_accuracy": float(summary["best"]["val_accuracy"])}}


def work_dir_for(model_path) -> Path:
    """Checkpoint folder next to the model: models/head.keras -> models/.head.work/."""
    p = Path(model_path)
    return p.parent / f".{p.stem}.work"

