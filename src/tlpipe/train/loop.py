"""The training loop: `fit`, deterministic and resumable, its policies small Keras callbacks.

Determinism: `fit` seeds Python/NumPy/TF (`keras.utils.set_random_seed`), turns on TF op
determinism, re-seeds every RNG layer of the model (dropout, augmentation) from the seed, and feeds
each epoch's arrays (data.epoch(e)) in an order drawn from (seed, epoch) alone. So the same inputs
give the same history, and an epoch's batches do not depend on whether earlier epochs ran in this
process.

The rest is policy, one keras.callbacks.Callback each (tlpipe.train.callbacks), chosen by the run's
TrainSettings (tlpipe.train.settings): Checkpoint (each epoch to the checkpoint folder; train.resume
continues the last finished one, bit for bit: tlpipe.train.checkpoint), KeepBest (train.keep: best
ends with the variables of the epoch of lowest validation loss, the earliest on ties, a NaN never:
tlpipe.history.best_epoch), Patience (train.patience), LearningRates (the schedule), Warmup (the
first steps' rates, within an epoch's model.fit), DvcLive (the
curves, step = epoch from 1), EpochBar, and the caller's on_epoch_end hook.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from tlpipe.runtime.errors import ConfigError
from tlpipe.history import best_epoch
from tlpipe.train.settings import TrainSettings

METRICS = ("loss", "accuracy")


def set_determinism(seed: int) -> None:
    """Seed every RNG Keras/TF/NumPy use and make TF kernels deterministic (and their thread pool the
    fixed size of tlpipe.runtime.threads, where TensorFlow has not started yet)."""
    import keras
    import tensorflow as tf

    from tlpipe.runtime import threads

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
    best = best_epoch(history)
    return {
        "epochs": len(history),
        "best_epoch": best,
        "best": dict(history[best - 1]),
        "last": dict(history[-1]),
    }


def fit(model, data, settings: TrainSettings | None = None, *, live_dir, checkpoint_dir=None,
        on_epoch_end: Callable[[int, dict], None] | None = None, keep_checkpoint: bool = False,
        verbose: bool = True, start: dict | None = None, **fields) -> dict:
    """Train a compiled model on `data` (a tlpipe.train.trainingdata.TrainingData) as `settings` say;
    log per-epoch metrics to dvclive at `live_dir` (None: not logged; head.lr: auto's trial runs).

    settings: a TrainSettings; `fields` (TrainSettings' own: epochs=, batch_size=, seed=, keep=, ...)
    replace its fields, or make one without it (tests, benches).
    checkpoint_dir: checkpoint folder (None: no checkpoints; checkpoint.checkpoint_dir_for gives the stages').
    on_epoch_end(epoch, row): called after each epoch is logged and checkpointed (1-based epoch).
    keep_checkpoint: leave the checkpoint when done (tests).
    verbose: False shows no bars and prints no epoch lines (head.lr: auto's trial runs).
    start: the start model's validation row (epoch 0, val_loss, val_accuracy; fine-tuning's, which
    train.keep: best counts as a candidate), logged to dvclive at step 0, so the curves show where
    training started and their lowest validation loss is the model saved.
    Returns `summarize(history)` plus "history" (a list of per-epoch dicts) and "kept_epoch" (the
    epoch whose variables the model holds).
    """
    import keras

    from tlpipe.train import callbacks as cb

    if settings is None:
        settings = TrainSettings(**fields)
    elif fields:
        settings = replace(settings, **fields)
    if getattr(model, "optimizer", None) is None or not getattr(model, "compiled", True):
        raise ConfigError("fit() needs a compiled model (tlpipe.train.compile.compile_classifier)")
    set_determinism(settings.seed)
    reseed_layers(model, settings.seed)
    batch_size = int(settings.batch_size)

    history: list[dict] = []  # the run's rows, shared by the policies (and restored by Checkpoint)
    policies = []
    keep_best = cb.KeepBest(history) if settings.keep == "best" else None
    if keep_best is not None:
        policies.append(keep_best)
    if checkpoint_dir is not None:
        policies.append(cb.Checkpoint(checkpoint_dir, settings, data.fingerprint, history, keep_best, keep_checkpoint))
    rates = settings.rates()
    # The warm-up's target where neither rates nor settings.lr give one: the compiled rate.
    compiled_lr = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) if settings.warmup_steps else None
    if rates is not None:
        policies.append(cb.LearningRates(rates))
    if live_dir is not None:
        policies.append(cb.DvcLive(live_dir, history, start))
    if verbose:
        policies.append(cb.EpochBar(settings.epochs, history))
    if on_epoch_end is not None:
        policies.append(cb.EpochHook(on_epoch_end, history))
    if settings.patience is not None:
        policies.append(cb.Patience(settings.patience, history, settings.epochs))
    callbacks = keras.callbacks.CallbackList(policies, model=model)

    model.stop_training = False
    try:
        callbacks.on_train_begin()
        validation = data.validation()
        for epoch in range(len(history), int(settings.epochs)):
            if model.stop_training:
                break
            callbacks.on_epoch_begin(epoch)
            x, y = data.epoch(epoch)
            order = epoch_order(len(y), settings.seed, epoch)
            steps = -(-len(y) // batch_size)
            in_epoch = [cb.BatchBar(steps, f"epoch {epoch + 1}")] if verbose else []
            if settings.warmup_steps and epoch * steps <= settings.warmup_steps:
                rate = rates[epoch] if rates is not None else (settings.lr if settings.lr is not None else compiled_lr)
                in_epoch.append(cb.Warmup(settings.warmup_steps, rate, epoch * steps))
            h = model.fit(x[order], y[order], batch_size=batch_size, shuffle=False, epochs=1, verbose=0,
                          validation_data=validation, validation_batch_size=batch_size,
                          callbacks=in_epoch).history
            row = {"epoch": epoch + 1}
            for key in METRICS:
                row[f"train_{key}"] = float(h[key][-1])
                row[f"val_{key}"] = float(h[f"val_{key}"][-1])
            history.append(row)
            callbacks.on_epoch_end(epoch, row)
        callbacks.on_train_end()
    finally:
        for policy in policies:
            if hasattr(policy, "close"):
                policy.close()
    result = summarize(history)
    result["history"] = history
    result["kept_epoch"] = result["best_epoch"] if keep_best is not None and history else len(history)
    return result


def metrics_of(summary: dict, model_path, run: TrainSettings, lr_search: list[dict] | None = None) -> dict:
    """What a training stage's metrics file holds: the best epoch (lowest val loss) and its val accuracy,
    under the model's name (the model file's stem, as in evaluate.json), so that `dvc exp show` names the
    columns head.best_epoch, finetuned.val_accuracy... rather than by file path. With train.keep: best
    (the default) the saved model is that epoch's, so these figures describe it; with keep: last it is
    the last epoch's. The per-epoch history is in dvclive's files.
    Also the settings `run` trained with, given or resolved from `auto`: the rate (`lr_used`, what
    finetune.lr: auto starts from), the epochs (`epochs_used`, the most it could run; patience may stop
    it sooner; named apart from the params head.lr, head.epochs..., which `dvc exp show` would otherwise
    have to prefix with their files) and, where the rate was `auto`, the sweep that chose it (`lr_search`, a list: `dvc metrics`
    skips it, the report shows it)."""
    out = {"best_epoch": int(summary["best_epoch"]), "val_accuracy": float(summary["best"]["val_accuracy"]),
           "lr_used": float(run.lr), "epochs_used": int(run.epochs)}
    if lr_search:
        out["lr_search"] = lr_search
    return {Path(model_path).stem: out}
