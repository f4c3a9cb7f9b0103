"""What train_head_aug and finetune share: a full model trained on augmented images, in one of two
modes (`augment.mode`):

- cached: only the part after the view cache's boundary runs (models.cached_training_model, built
  from the SAME layer objects as the full model, so training it trains the full model in place) on
  views.CachedViews; when that part is frozen too (train_head_aug), the head alone trains on
  views.FrozenSuffix.
- online (the book's way): the full model on online.OnlineAugmented.

Either way the full model is what gets saved; in cached mode its prefix (frozen) is untouched.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from tlpipe.config.choices import AUGMENT_MODES
from tlpipe.runtime.errors import ConfigError
from tlpipe.runtime.log import log


def cache_expect(backbone, augment, compute, class_names) -> dict:
    """The view cache attrs the current params imply (the caller adds unfreeze_from where it matters)."""
    from tlpipe.features import backbones
    from tlpipe.features.augment import augment_settings

    return {"backbone": backbone.name, "weights": backbone.weights, "image_size": backbone.image_size,
            "preprocessing": backbones.preprocessing_name(backbone.name, backbone.weights),
            "precision": compute.precision, "views": int(augment.views),
            "augment": augment_settings(augment), "class_names": list(class_names)}


def choose_data(full, augment, seed: int, *, cache, split_dir, images_dir, expect: dict):
    """(the model to train, its training data) for `full` in augment.mode. The model shares its
    layers with `full`, so training it trains `full`. Close the data when done (it is a context manager)."""
    from tlpipe.features.augment import augment_settings
    from tlpipe.model.saved import head_submodel, model_info
    from tlpipe.train.models import cached_training_model
    from tlpipe.train.online import OnlineAugmented
    from tlpipe.train.views import CachedViews, FrozenSuffix

    if augment.mode == "cached":
        views = CachedViews(cache, seed, expect)
        try:
            model = cached_training_model(full, views.attrs["boundary"])
        except BaseException:
            views.close()
            raise
        if model.get_layer("suffix").trainable_variables:
            return model, views
        with views:  # frozen suffix (train_head_aug): its pooled output per view never changes
            return head_submodel(full), FrozenSuffix(views, model)
    if augment.mode == "online":
        info = model_info(full)
        return full, OnlineAugmented.from_manifests(split_dir, images_dir, info["class_names"], info["image_size"],
                                                    augment_settings(augment))
    raise ConfigError(f"augment.mode: must be one of {', '.join(AUGMENT_MODES)}, got {augment.mode!r}")


def fit_and_save(full, model, data, run, *, live_dir, model_path, on_epoch_end=None, start_counts=False) -> dict:
    """Compile and fit `model` (choose_data's) on `data` as `run` (a settings.TrainSettings with lr and
    schedule) says, then save `full` atomically to `model_path`; returns fit's summary with the
    per-epoch history. keep="best" (train.keep) restores the best epoch's variables into `model`'s
    layers, which are `full`'s, so `full` is saved with them. start_counts (fine-tuning, whose start
    is a trained model): with keep="best" the start is a candidate too, as epoch 0: where no epoch has
    a lower validation loss, `full` is saved as it came, and the summary's best_epoch is 0."""
    from tlpipe.model.saved import model_info, save_model
    from tlpipe.train.checkpoint import checkpoint_dir_for
    from tlpipe.train.compile import compile_classifier
    from tlpipe.train.loop import fit
    from tlpipe.train.models import detached

    compile_classifier(model, len(model_info(full)["class_names"]), run.lr)
    start = _start(model, data, run) if start_counts and run.keep == "best" else None
    t0 = time.perf_counter()
    result = fit(model, data, run, live_dir=live_dir, checkpoint_dir=checkpoint_dir_for(model_path), on_epoch_end=on_epoch_end,
                 start=start["row"] if start is not None else None)
    seconds = time.perf_counter() - t0
    best = result.get("best") or {}
    if start is not None and math.isfinite(start["row"]["val_loss"]) \
            and not best.get("val_loss", math.inf) < start["row"]["val_loss"]:
        for v, a in zip(model.variables, start["variables"]):
            v.assign(a)
        # After fit's own "kept epoch N" line: say that the start replaces it, and why.
        beaten = (f" instead of epoch {result['best_epoch']} ({best['val_loss']:.4f})"
                  if result.get("best_epoch") and "val_loss" in best else "")
        result.update(best_epoch=0, best=start["row"], kept_epoch=0)
        log.info(f"kept the start model{beaten}: no epoch's val_loss below its {start['row']['val_loss']:.4f} "
                 f"(train.keep: best)")
    log.info(f"{Path(model_path).name}: {data.fingerprint['mode']} mode, "
             f"{seconds / max(1, len(result['history'])):.1f} s/epoch")
    save_model(detached(full), model_path)
    return result


def _start(model, data, run) -> dict:
    """The start model's validation loss and accuracy (epoch 0), evaluated as fit evaluates an epoch,
    and a copy of its variables."""
    from tlpipe.train.checkpoint import snapshot
    from tlpipe.train.loop import set_determinism

    set_determinism(run.seed)
    x, y = data.validation()
    loss, accuracy = model.evaluate(x, y, batch_size=int(run.batch_size), verbose=0)
    return {"row": {"epoch": 0, "val_loss": float(loss), "val_accuracy": float(accuracy)},
            "variables": snapshot(model)}
