"""The finetune stage: a trained model, its base trainable from finetune.unfreeze_from on, trained
jointly with the head on augmented images."""

from __future__ import annotations

from pathlib import Path

from tlpipe.runtime.errors import ModelFileError


def run_finetune(*, cache, split_dir, images_dir, model_in, model_out, metrics_out, live_dir, backbone,
                 compute, augment, finetune, run, on_epoch_end=None) -> dict:
    """Load and unfreeze the model, choose the data (augment.mode), fit, save the full model and the
    metrics file; returns fit's summary with the per-epoch history. `finetune`: params.finetune
    (unfreeze_from); `run`: the settings.TrainSettings of params.finetune and params.train."""
    from tlpipe.data.manifests import read_class_names
    from tlpipe.model.saved import model_info
    from tlpipe.train.augmented import cache_expect, choose_data, fit_and_save
    from tlpipe.atomic import write_json
    from tlpipe.train.loop import metrics_of
    from tlpipe.train.models import finetune_model
    from tlpipe.train.strategy import training_strategy

    classes = read_class_names(Path(split_dir) / "classes.json")
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
            result = fit_and_save(full, model, data, run, live_dir=live_dir, model_path=model_out,
                                  on_epoch_end=on_epoch_end)
    write_json(metrics_out, metrics_of(result, model_out))
    return result
