"""The train_head_aug stage: a fresh head on the frozen base, trained on augmented images."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tlpipe.runtime.errors import ConfigError
from tlpipe.runtime.log import log

# head_aug.epochs: auto. A budget in optimizer steps (settings.budget_epochs). 30 epochs left the best
# epoch at the last on both shared sets; by bench/head_aug_lr.py, cats vs dogs' best (rate 1e-4) came at
# 2925 steps, monkeys' (3e-4) at 2345 (58.0% validation against 53.4 at 30 epochs; at 200 epochs the
# sweep chose 1e-4, 0.02 lower loss, 3 points less accuracy; docs/results.md). The epochs are cheap
# here: the head trains on the views' pooled features, computed once.
STEPS = 3000
MAX_EPOCHS = 100


def auto_epochs(n_train: int, batch_size: int) -> int:
    """head_aug.epochs: auto: the epochs that make at least STEPS steps of `batch_size` over `n_train`
    images, at most MAX_EPOCHS."""
    from tlpipe.train.settings import budget_epochs

    return budget_epochs(n_train, batch_size, STEPS, MAX_EPOCHS)


def run_head_aug(*, cache, split_dir, images_dir, model_out, metrics_out, live_dir, backbone, compute,
                 head, run, augment, on_epoch_end=None, train_features=None) -> dict:
    """Build the model, choose the data (augment.mode), fit, save the full model and the metrics file;
    returns fit's summary with the per-epoch history. `head`: params.head (units, dropout,
    standardize); `run`: the settings.TrainSettings of params.head_aug and params.train.
    `train_features`: the training split's stored features (features/train.h5), whose statistics the
    head standardises with when head.standardize (plain images at the same cut: the views' own
    statistics would need a pass over every view, and online mode has none stored).

    head_aug.lr: auto (run.lr None) trains the head at each rate of lr_search.CANDIDATES on the views'
    pooled features, as train_head does on the stored ones: with the base frozen, the views go through
    it once (FrozenSuffix) and each run costs about a second an epoch. It needs augment.mode: cached
    (online, every run would push every image through the whole base). head_aug.epochs: auto (run.epochs
    None): auto_epochs of the training images."""
    from tlpipe.data.manifests import read_class_names
    from tlpipe.train.augmented import cache_expect, choose_data, fit_and_save
    from tlpipe.train.settings import with_budget_epochs
    from tlpipe.atomic import write_json
    from tlpipe.train.loop import metrics_of
    from tlpipe.train.strategy import training_strategy

    if run.lr is None and augment.mode != "cached":
        raise ConfigError(f"head_aug.lr: auto needs augment.mode: cached (got {augment.mode!r}): online, "
                          f"each candidate rate would run the whole base over every image; set a rate")
    classes = read_class_names(Path(split_dir) / "classes.json")
    fresh = model_maker(backbone, compute, head, run.seed, classes, train_features)
    search = None
    with training_strategy(compute.strategy, run.batch_size).scope():  # models built, compiled, fit in it
        full = fresh()
        model, data = choose_data(full, augment, run.seed, cache=cache, split_dir=split_dir,
                                  images_dir=images_dir, expect=cache_expect(backbone, augment, compute, classes))
        with data:
            run = with_budget_epochs(run, data.n_train, auto_epochs, "head_aug.epochs")
            if run.lr is None:
                search, run, result = _sweep(full, data, run, fresh, len(classes), live_dir, model_out)
            else:
                result = fit_and_save(full, model, data, run, live_dir=live_dir, model_path=model_out,
                                      on_epoch_end=on_epoch_end)
    write_json(metrics_out, metrics_of(result, model_out, run, search))
    return result


def model_maker(backbone, compute, head, seed: int, classes, train_features):
    """() -> a new full model with a fresh head (seeded alike) on the frozen base; the head standardises
    with the statistics of `train_features` (features/train.h5) when head.standardize."""
    from tlpipe.train.models import new_model

    stats = None
    if head.standardize:
        from tlpipe.features.featurefile import read_features
        from tlpipe.model.dense_head import feature_stats

        x = read_features(train_features, expect={"layer": backbone.layer, "pooling": backbone.pooling,
                                                  "class_names": list(classes)})[0]
        stats = feature_stats(x)

    def fresh():
        return new_model(backbone, compute.precision, head.units, head.dropout, seed, classes, stats=stats)

    return fresh


def head_maker(fresh, n_classes: int):
    """lr -> the compiled head of a `fresh()` model (lr_search.sweep's make_model on the views' features)."""
    from tlpipe.model.saved import head_submodel
    from tlpipe.train.compile import compile_classifier

    def make(lr):
        return compile_classifier(head_submodel(fresh()), n_classes, lr)

    return make


def _sweep(full, data, run, fresh, n_classes: int, live_dir, model_out):
    """head_aug.lr: auto. Each candidate trains the head of a fresh model (same seed, so the same start)
    on `data`; the chosen run's weights go into `full`'s head, which is saved. -> (sweep rows, run with
    the chosen rate, the chosen run's fit result)."""
    from tlpipe.model.saved import head_submodel, save_model
    from tlpipe.train import lr_search
    from tlpipe.train.callbacks import write_live
    from tlpipe.train.models import detached

    log.info(f"head_aug.lr auto: training the head at {len(lr_search.CANDIDATES)} rates on the views' features")
    rows, (lr, model, result) = lr_search.sweep(head_maker(fresh, n_classes), data, run)
    head_submodel(full).set_weights(model.get_weights())
    write_live(live_dir, result["history"])
    log.info(f"head_aug.lr auto: {lr:g} (lowest validation loss), its run kept")
    save_model(detached(full), model_out)
    return rows, replace(run, lr=lr), result
