"""The finetune stage: a trained model, its base trainable from finetune.unfreeze_from on, trained
jointly with the head on augmented images."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from tlpipe.runtime.errors import ConfigError, ModelFileError
from tlpipe.runtime.log import log

# finetune.lr: auto. Fine-tuning moves pretrained convolutions, which a head's rate would wreck: it
# starts at this fraction of the rate the start model's head trained at (cats vs dogs, offline
# weights: head_aug chose 1e-4 and fine-tuning's grid 3e-5 of 1e-5, 3e-5, 1e-4), never above
# MAX_LR (monkeys: head_aug chose 3e-4, and at 0.3 x that, 9e-5, fine-tuning fell from 53% to
# 24-35% validation accuracy in its first four epochs; docs/results.md).
LR_FRACTION = 0.3
MAX_LR = 3e-5
# finetune.epochs: auto. A budget in optimizer steps (settings.budget_epochs), small: its epochs
# are the pipeline's most expensive (docs/results.md).
STEPS = 600
MAX_EPOCHS = 30


def auto_epochs(n_train: int, batch_size: int) -> int:
    """finetune.epochs: auto: the epochs that make at least STEPS steps of `batch_size` over `n_train`
    images, at most MAX_EPOCHS."""
    from tlpipe.train.settings import budget_epochs

    return budget_epochs(n_train, batch_size, STEPS, MAX_EPOCHS)


def auto_lr(start: float) -> float:
    """finetune.lr: auto for a start model trained at rate `start`."""
    return min(LR_FRACTION * float(start), MAX_LR)


def start_lr(metrics_path, model_in) -> float:
    """The rate the start model trained at, from its stage's metrics file (train.loop.metrics_of)."""
    name = Path(model_in).stem
    try:
        return float(json.loads(Path(metrics_path).read_text())[name]["lr_used"])
    except FileNotFoundError:
        raise ConfigError(f"finetune.lr: auto needs {metrics_path}, the metrics of the stage that wrote "
                          f"{model_in}; run it (`dvc repro`) or set finetune.lr") from None
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"finetune.lr: auto: {metrics_path} has no {name}.lr_used (written by an older tlpipe?); "
                          f"rerun the stage that writes {model_in}, or set finetune.lr") from None


def run_finetune(*, cache, split_dir, images_dir, model_in, model_out, metrics_out, live_dir, backbone,
                 compute, augment, finetune, run, start_metrics=None, on_epoch_end=None) -> dict:
    """Load and unfreeze the model, choose the data (augment.mode), fit, save the full model and the
    metrics file; returns fit's summary with the per-epoch history. `finetune`: params.finetune
    (unfreeze_from); `run`: the settings.TrainSettings of params.finetune and params.train (its lr and
    epochs None where they are auto: resolved here, auto_lr of the start model's rate as read from
    `start_metrics`, and auto_epochs of the training images)."""
    from tlpipe.data.manifests import read_class_names
    from tlpipe.model.saved import model_info
    from tlpipe.train.augmented import cache_expect, choose_data, fit_and_save
    from tlpipe.train.settings import with_budget_epochs
    from tlpipe.atomic import write_json
    from tlpipe.train.loop import metrics_of
    from tlpipe.train.models import finetune_model
    from tlpipe.train.strategy import training_strategy

    classes = read_class_names(Path(split_dir) / "classes.json")
    if run.lr is None:
        run = replace(run, lr=auto_lr(start_lr(start_metrics, model_in)))
        log.info(f"finetune.lr auto: {run.lr:.3g} ({LR_FRACTION} x the rate {Path(model_in).name} trained at, "
                 f"at most {MAX_LR:g})")
    # The start model is loaded, the model built, compiled and fit in the strategy's scope.
    with training_strategy(compute.strategy, run.batch_size).scope():
        full = finetune_model(model_in, backbone, compute.precision, finetune.unfreeze_from)
        if model_info(full)["class_names"] != list(classes):
            raise ModelFileError(f"{model_in}: trained for classes {model_info(full)['class_names']}, the split "
                                 f"has {classes}; rerun the stage that writes it")
        # auto resolved against the model's layer (finetune_model), as the viewcache stage resolved it.
        expect = {**cache_expect(backbone, augment, compute, classes),
                  "unfreeze_from": model_info(full)["trainable_from"]}
        model, data = choose_data(full, augment, run.seed, cache=cache, split_dir=split_dir,
                                  images_dir=images_dir, expect=expect)
        with data:
            run = with_budget_epochs(run, data.n_train, auto_epochs, "finetune.epochs")
            result = fit_and_save(full, model, data, run, live_dir=live_dir, model_path=model_out,
                                  on_epoch_end=on_epoch_end, start_counts=True)
    write_json(metrics_out, metrics_of(result, model_out, run))
    return result
