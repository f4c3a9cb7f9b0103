"""The train_head_aug stage: a fresh head on the frozen base, trained on augmented images."""

from __future__ import annotations

from pathlib import Path


def run_head_aug(*, cache, split_dir, images_dir, model_out, metrics_out, live_dir, backbone, compute,
                 head, run, augment, on_epoch_end=None, train_features=None) -> dict:
    """Build the model, choose the data (augment.mode), fit, save the full model and the metrics file;
    returns fit's summary with the per-epoch history. `head`: params.head (units, dropout,
    standardize); `run`: the settings.TrainSettings of params.head_aug and params.train.
    `train_features`: the training split's stored features (features/train.h5), whose statistics the
    head standardises with when head.standardize (plain images at the same cut: the views' own
    statistics would need a pass over every view, and online mode has none stored)."""
    from tlpipe.data.manifests import read_class_names
    from tlpipe.train.augmented import cache_expect, choose_data, fit_and_save
    from tlpipe.atomic import write_json
    from tlpipe.train.loop import metrics_of
    from tlpipe.train.models import new_model
    from tlpipe.train.strategy import training_strategy

    classes = read_class_names(Path(split_dir) / "classes.json")
    stats = None
    if head.standardize:
        from tlpipe.features.featurefile import read_features
        from tlpipe.model.dense_head import feature_stats

        x = read_features(train_features, expect={"layer": backbone.layer, "pooling": backbone.pooling,
                                                  "class_names": list(classes)})[0]
        stats = feature_stats(x)
    with training_strategy(compute.strategy, run.batch_size).scope():  # models built, compiled, fit in it
        full = new_model(backbone, compute.precision, head.units, head.dropout, run.seed, classes, stats=stats)
        model, data = choose_data(full, augment, run.seed, cache=cache, split_dir=split_dir,
                                  images_dir=images_dir, expect=cache_expect(backbone, augment, compute, classes))
        with data:
            result = fit_and_save(full, model, data, run, live_dir=live_dir, model_path=model_out,
                                  on_epoch_end=on_epoch_end)
    write_json(metrics_out, metrics_of(result, model_out))
    return result
