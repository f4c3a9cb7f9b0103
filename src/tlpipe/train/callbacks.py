"""The policies of a training run, each a small keras.callbacks.Callback that `loop.fit` drives.

fit, not model.fit, drives them: each epoch is its own model.fit call (data.epoch(e) gives each
epoch its own arrays), so inside model.fit every epoch would be epoch 0. fit calls on_train_begin
once (after seeding), on_epoch_begin(e) and on_epoch_end(e, logs=row) with e the run's 0-based epoch
and row its metrics (already appended to the run's history, which the callbacks share), on_train_end
once the run has finished, and close() on those that have one always, after an error or Ctrl-C too.
A callback stops the run by setting model.stop_training, as Keras' EarlyStopping does; fit checks it
before each epoch.

Why not Keras' own: BackupAndRestore (see checkpoint.py); EarlyStopping keeps its count in memory
and restores the best weights only at the end of a model.fit call, while ours read the history,
which the checkpoint keeps, so a resumed run stops and keeps what an uninterrupted one would;
LearningRateScheduler writes the rate into the epoch's logs (our history, hence the checkpoint);
dvclive.keras.DVCLiveCallback names validation metrics eval/* (dvc.yaml's plots read val/*), ends
the Live at each model.fit's end and cannot replay a resumed run's epochs; tqdm.keras.TqdmCallback
opens an epoch bar of its own in every model.fit call and counts batches as floats ("1.00/4.00").
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import keras

from tlpipe.history import best_epoch
from tlpipe.runtime.log import log, progress
from tlpipe.train import checkpoint


def should_stop(history: list[dict], patience: int | None) -> bool:
    """Early stopping: `patience` epochs in a row have passed without a new best (None: never)."""
    if not patience or not history:
        return False
    return len(history) - best_epoch(history) >= int(patience)


class LearningRates(keras.callbacks.Callback):
    """The optimizer's rate per epoch (compile.learning_rates): a function of the epoch alone, so a
    resumed run sets the rates an uninterrupted one would."""

    def __init__(self, rates: list[float]):
        super().__init__()
        self.rates = rates

    def on_epoch_begin(self, epoch, logs=None):
        self.model.optimizer.learning_rate = self.rates[epoch]


class Warmup(keras.callbacks.Callback):
    """Linear warm-up, passed to one epoch's model.fit: the optimizer's rate at the run's step s (0-based,
    counted from the run's first epoch) is `rate` * (s + 1) / `steps` while s < `steps`, then `rate`.
    The step comes from the epoch and the batch alone, so a resumed run sets the rates an uninterrupted
    one would."""

    def __init__(self, steps: int, rate: float, first_step: int):
        super().__init__()
        self.steps, self.rate, self.first_step = int(steps), float(rate), int(first_step)

    def on_train_batch_begin(self, batch, logs=None):
        step = self.first_step + int(batch)
        if step <= self.steps:
            self.model.optimizer.learning_rate = self.rate * min(step + 1, self.steps) / self.steps


class KeepBest(keras.callbacks.Callback):
    """train.keep: best: holds a copy of the best epoch's variables (`best`, which the checkpoint
    stores and restores) and ends the run with them."""

    def __init__(self, history: list[dict]):
        super().__init__()
        self.history = history
        self.best = None

    def on_epoch_end(self, epoch, logs=None):
        if best_epoch(self.history) == epoch + 1:
            self.best = checkpoint.snapshot(self.model)

    def on_train_end(self, logs=None):
        kept = best_epoch(self.history)
        if kept is not None and kept != len(self.history):
            for v, a in zip(self.model.variables, self.best):
                v.assign(a)
            log.info(f"kept epoch {kept} of {len(self.history)} (lowest val_loss; train.keep: best)")


class Patience(keras.callbacks.Callback):
    """train.patience: stop after `patience` epochs in a row without a new best. Decided from the
    history alone (also right after a resume), so a resumed run stops where an uninterrupted one does."""

    def __init__(self, patience: int, history: list[dict], epochs: int):
        super().__init__()
        self.patience, self.history, self.epochs = int(patience), history, int(epochs)

    def _check(self):
        if len(self.history) < self.epochs and should_stop(self.history, self.patience):
            self.model.stop_training = True
            log.info(f"early stop after epoch {len(self.history)}: no lower val_loss in {self.patience} epochs "
                     f"(best epoch {best_epoch(self.history)})")

    def on_train_begin(self, logs=None):
        self._check()

    def on_epoch_end(self, epoch, logs=None):
        self._check()


class Checkpoint(keras.callbacks.Callback):
    """Checkpoints each epoch to `checkpoint_dir` (checkpoint.py). At the start, with settings.resume, restores
    the last finished epoch of a checkpoint of this run (its history into `history`, its best epoch's
    variables into `keep_best`), else removes any stale one; at the end removes it unless `keep_checkpoint`."""

    def __init__(self, checkpoint_dir, settings, data_fingerprint: dict, history: list[dict],
                 keep_best: KeepBest | None = None, keep_checkpoint: bool = False):
        super().__init__()
        self.folder, self.settings, self.data_fingerprint = Path(checkpoint_dir), settings, data_fingerprint
        self.history, self.keep_best, self.keep_checkpoint = history, keep_best, keep_checkpoint

    def on_train_begin(self, logs=None):
        self.fingerprint = checkpoint.fingerprint(self.model, self.settings, self.data_fingerprint)
        if not self.settings.resume:
            if self.folder.exists():
                shutil.rmtree(self.folder)
            return
        restored = checkpoint.load_checkpoint(self.folder, self.model, self.fingerprint, int(self.settings.epochs))
        if restored is None:
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        epoch, history, best = restored
        self.history[:] = history[:epoch]
        if self.keep_best is not None:
            self.keep_best.best = best
        log.info(f"resuming after epoch {epoch} from {self.folder}")

    def on_epoch_end(self, epoch, logs=None):
        checkpoint.save_checkpoint(self.folder, self.model, epoch + 1, self.history, self.fingerprint,
                                   self.keep_best.best if self.keep_best is not None else None)

    def on_train_end(self, logs=None):
        if not self.keep_checkpoint:
            shutil.rmtree(self.folder, ignore_errors=True)


class DvcLive(keras.callbacks.Callback):
    """Per-epoch train/ and val/ loss and accuracy to dvclive at `live_dir`, at step = the epoch
    (1-based, as metrics' best_epoch); `start` (fine-tuning's start model, validation only) at step 0.
    A resumed run first logs the restored epochs again, so the files equal an uninterrupted run's."""

    def __init__(self, live_dir, history: list[dict], start: dict | None = None):
        super().__init__()
        self.live_dir, self.history, self.start, self.live = live_dir, history, start, None

    def _log(self, row: dict) -> None:
        self.live.step = int(row["epoch"])
        for split in ("train", "val"):
            for key in ("loss", "accuracy"):
                if f"{split}_{key}" in row:  # the start row has no training figures
                    self.live.log_metric(f"{split}/{key}", row[f"{split}_{key}"])
        self.live.make_summary()

    def on_train_begin(self, logs=None):
        from dvclive import Live

        # No dvc.yaml, no report, no experiment commit, no git: the pipeline's dvc.yaml owns all that.
        self.live = Live(dir=str(self.live_dir), resume=False, report=None, save_dvc_exp=False, dvcyaml=None,
                         monitor_system=False)
        for row in ([self.start] if self.start is not None else []) + self.history:
            self._log(row)

    def on_epoch_end(self, epoch, logs=None):
        self._log(self.history[-1])

    def close(self):
        if self.live is not None:
            self.live.end()


def write_live(live_dir, history: list[dict]) -> None:
    """dvclive's files for a run already trained (head.lr: auto keeps a sweep's run), as fit writes them."""
    live = DvcLive(live_dir, history)
    live.on_train_begin()  # logs every row of the history, as for a resumed run
    live.close()


class EpochBar(keras.callbacks.Callback):
    """A progress bar over the run's epochs, and one line of metrics per epoch (stderr)."""

    def __init__(self, epochs: int, history: list[dict]):
        super().__init__()
        self.epochs, self.history, self.bar = int(epochs), history, None

    def on_train_begin(self, logs=None):
        self.bar = progress(total=self.epochs, initial=len(self.history), desc="epochs", unit="epoch")

    def on_epoch_end(self, epoch, logs=None):
        row = self.history[-1]
        self.bar.update(1)
        self.bar.write(f"epoch {epoch + 1}/{self.epochs}: loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
                       f" - val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f}", file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class BatchBar(keras.callbacks.Callback):
    """A progress bar over one epoch's batches: passed to that epoch's model.fit."""

    def __init__(self, total: int | None, desc: str):
        super().__init__()
        self.total, self.desc = total, desc

    def on_train_begin(self, logs=None):
        self.bar = progress(total=self.total, desc=self.desc, unit="batch", leave=False)

    def on_train_batch_end(self, batch, logs=None):
        self.bar.update(1)

    def on_train_end(self, logs=None):
        self.bar.close()


class EpochHook(keras.callbacks.Callback):
    """`on_epoch_end(epoch, row)` after each epoch is logged and checkpointed (1-based epoch): the
    hook the benches time epochs with."""

    def __init__(self, fn, history: list[dict]):
        super().__init__()
        self.fn, self.history = fn, history

    def on_epoch_end(self, epoch, logs=None):
        self.fn(epoch + 1, self.history[-1])
