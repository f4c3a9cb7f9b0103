"""Training with augmentation: the head on a frozen base (train_head_aug) and fine-tuning (finetune).

Both train a full tlpipe model (modelio format) in one of two modes (`augment.mode`):

- cached (default): only the part after the freeze boundary runs: an input of boundary activations
  -> the base's suffix (block5 for VGG16) -> pool -> head, built from the SAME layer objects as the
  full model, so training it trains the full model in place. Each epoch shows every training image
  as one of its cached views (`viewcache.epoch_views`); validation uses the cached plain images.
  When the suffix is frozen too (train_head_aug), its pooled output per view is computed once and
  only the head trains: identical numbers, a head-only epoch.
- online (the book's way): the full model on freshly augmented images (view = epoch number),
  validated on the plain validation images.

In both modes the full model is what gets saved; in cached mode its prefix (frozen) is untouched.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlpipe.errors import ConfigError, FeatureFileError, ModelFileError


@dataclass(frozen=True)
class RunSettings:
    """One training run's `lr, epochs, batch_size, seed` (params.head_aug or params.finetune)."""
    lr: float
    epochs: int
    batch_size: int
    seed: int

    @classmethod
    def from_params(cls, section) -> "RunSettings":
        return cls(float(section.lr), int(section.epochs), int(section.batch_size), int(section.seed))


# ---------------------------------------------------------------- models

def cached_training_model(full, boundary: str):
    """Boundary activations -> probabilities, sharing the suffix, pool and head layers of `full`."""
    import keras

    from tlpipe.model.head import HEAD_LAYERS

    base = full.get_layer("base")
    try:
        start = base.get_layer(boundary)
    except ValueError:
        raise FeatureFileError(f"the model's base has no layer {boundary!r} (the cache's boundary); rebuild "
                               f"the cache for this model (dvc repro viewcache)") from None
    try:
        suffix = keras.Model(start.output, base.output, name="suffix")
    except ValueError:
        raise ConfigError(f"finetune.unfreeze_from: the model cannot be split after {boundary!r} (a residual "
                          f"connection crosses it); choose a layer that starts a block") from None
    x = inputs = keras.Input(shape=tuple(start.output.shape[1:]), name="activations",
                             dtype=start.output.dtype)
    x = full.get_layer("pool")(suffix(x))
    for name in HEAD_LAYERS:
        x = full.get_layer(name)(x)
    return keras.Model(inputs, x, name=f"{full.name}_from_{boundary}")


def detached(full):
    """A copy of `full` whose layers belong to it alone. Training in cached mode calls the full model's
    layers in a second graph; saving them then records memory addresses (shared_object_id), which
    would make the file's bytes differ between identical runs."""
    import keras

    from tlpipe.model.saved import Preprocess

    clean = keras.Model.from_config(full.get_config(), custom_objects={"Preprocess": Preprocess})
    clean.set_weights(full.get_weights())
    for src, dst in zip(_all_layers(full), _all_layers(clean)):
        dst.trainable = src.trainable
    return clean


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def freeze_batchnorm(model) -> None:
    """BatchNorm layers stay in inference mode when fine-tuning (Keras' advice): freeze them all."""
    import keras

    def walk(layer):
        for sub in getattr(layer, "layers", []):
            if isinstance(sub, keras.layers.BatchNormalization):
                sub.trainable = False
            walk(sub)

    walk(model)


def new_model(backbone, precision: str, units: int, dropout: float, seed: int, class_names, base=None):
    """A full model with a fresh head (seeded) on the frozen base (`backbone`: params.backbone)."""
    from tlpipe.features import backbones
    from tlpipe.model.head import build_head
    from tlpipe.model.saved import assemble, truncate_base

    if base is None:
        base = backbones.build_base(backbone.name, backbone.weights, backbone.image_size, precision)
    layer = backbones.resolve_layer(base, backbone.layer)
    width = _pooled_width(truncate_base(base, layer), backbone.pooling)
    with backbones.dtype_policy(precision):
        head = build_head(width, len(class_names), units, dropout, seed=int(seed))
    info = _info(backbone, class_names, layer, None)
    return assemble(base, layer, backbone.pooling, head, info, name="head_aug")


def _pooled_width(sub, pooling: str) -> int:
    shape = sub.output.shape[1:]
    return int(np.prod(shape)) if pooling == "flatten" else int(shape[-1])


def _info(backbone, class_names, layer, trainable_from) -> dict:
    from tlpipe.features import backbones

    return {"class_names": list(class_names), "image_size": backbone.image_size, "backbone": backbone.name,
            "weights": backbone.weights,
            "weights_sha256": backbones.weights_sha256(backbone.name, backbone.weights, backbone.image_size),
            "layer": layer, "pooling": backbone.pooling,
            "preprocessing": backbones.preprocessing_name(backbone.name, backbone.weights),
            "trainable_from": trainable_from}


def finetune_model(start_path, backbone, precision: str, unfreeze_from: str):
    """The model of `start_path` rebuilt under `precision`, base trainable from `unfreeze_from` on."""
    from tlpipe.features import backbones
    from tlpipe.model.saved import assemble, head_submodel, load_model, model_info, set_trainable_from

    start = load_model(start_path)
    info = model_info(start)
    for key, param in (("backbone", "name"), ("weights", "weights"), ("image_size", "image_size"),
                       ("pooling", "pooling")):
        if info[key] != getattr(backbone, param):
            raise ModelFileError(f"{start_path}: built with {key} {info[key]!r} but params.yaml has "
                                 f"backbone.{param}: {getattr(backbone, param)!r}; rerun the stage that writes it")
    base = backbones.build_base(info["backbone"], "none", info["image_size"], precision)
    valid = [lyr.name for lyr in start.get_layer("base").layers][1:]
    if unfreeze_from not in valid:
        raise ConfigError(f"finetune.unfreeze_from: {info['backbone']} (as stored in {start_path}) has no "
                          f"layer {unfreeze_from!r}; choose one of: {', '.join(valid)}")
    model = assemble(base, info["layer"], info["pooling"], head_submodel(start),
                     {k: v for k, v in info.items() if k != "tlpipe_version"}, name="finetuned")
    # The trained weights (frozen or not) come from the file; the fresh base only gives the layers.
    model.get_layer("base").set_weights(start.get_layer("base").get_weights())
    set_trainable_from(model, unfreeze_from)
    freeze_batchnorm(model)
    return model


# ---------------------------------------------------------------- data

def load_images(files, image_size: int, batch_size: int = 64) -> np.ndarray:
    """Decoded, resized RGB 0..255 float32 images [N, S, S, 3], in file order."""
    from tlpipe.features.inputs import image_dataset

    if not len(files):
        return np.zeros((0, image_size, image_size, 3), np.float32)
    return np.concatenate([b.numpy() for b in image_dataset(files, image_size, batch_size, None)])


def online_epochs(images: np.ndarray, labels, settings: dict, views=None):
    """epoch -> (augmented images, labels): view `epoch` of every training image (fit shuffles).
    `views` (epoch -> one view number per image) picks other views, e.g. the ones cached training
    draws (viewcache.epoch_views)."""
    from tlpipe.features.augment import augment_images, image_seeds

    labels = np.asarray(labels, np.int64)

    def epoch(e: int):
        view = np.full(len(images), e) if views is None else np.asarray(views(e))
        out = np.empty_like(images)
        for s in range(0, len(images), 64):
            idx = np.arange(s, min(len(images), s + 64))
            out[idx] = augment_images(images[idx], image_seeds(settings["seed"], view[idx], idx), settings).numpy()
        return out, labels
    return epoch


# ---------------------------------------------------------------- training

def frozen_features_model(cached_model):
    """Boundary activations -> pooled features, for a cached training model whose suffix is frozen."""
    import keras

    inputs = keras.Input(shape=tuple(cached_model.inputs[0].shape[1:]), dtype=cached_model.inputs[0].dtype)
    x = cached_model.get_layer("pool")(cached_model.get_layer("suffix")(inputs))
    return keras.Model(inputs, x, name="frozen_features")


def _frozen_suffix_data(full, cached_model, reader, val_data, seed: int):
    from tlpipe.model.saved import head_submodel
    from tlpipe.features.viewcache import epoch_views

    features = frozen_features_model(cached_model)
    t0 = time.perf_counter()
    train_feats = reader.map_views(lambda x: features.predict(x, batch_size=64, verbose=0))
    val_feats = features.predict(val_data[0], batch_size=64, verbose=0)
    print(f"frozen suffix: pooled features of {reader.n} images x {reader.views} views in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    rows = np.arange(reader.n)
    labels = reader.labels.copy()

    def epoch(e: int):
        return train_feats[rows, epoch_views(reader.n, reader.views, seed, e)], labels
    return head_submodel(full), epoch, (val_feats, val_data[1])


def train(full, mode: str, run: RunSettings, *, cache_path=None, expect: dict | None = None,
          train_rows=None, val_rows=None, augment_params=None, live_dir, model_path,
          resume: bool = False, class_names=None) -> dict:
    """Train `full` in `mode` (cached: on the view cache; online: on augmented images), save it
    atomically to `model_path`, return the metrics (training.fit's summary, with mode, without history).

    cached needs cache_path (+ expect: attrs it must match); online needs train_rows/val_rows
    ((files, labels, paths) tuples) and augment_params."""
    from tlpipe.train import loop as training
    from tlpipe.features import viewcache
    from tlpipe.features.augment import augment_settings
    from tlpipe.model.head import compile_head
    from tlpipe.model.saved import model_info, save_model

    n_classes = len(model_info(full)["class_names"])
    fingerprint = {"lr": run.lr, "mode": mode}
    t0 = time.perf_counter()
    if mode == "cached":
        attrs = viewcache.read_attrs(cache_path)
        viewcache.check_attrs(cache_path, attrs, {"mode": "cached", **(expect or {})})
        model = cached_training_model(full, attrs["boundary"])
        reader = viewcache.ViewReader(cache_path)
        val = viewcache.load_part(cache_path, "validation")
        val_data = (val[0].astype(np.float32), val[1])
        fingerprint["cache"] = attrs
        train_data = lambda e: reader.epoch(run.seed, e)  # noqa: E731
        if not model.get_layer("suffix").trainable_variables:
            # Frozen suffix (train_head_aug): its pooled output per view never changes, so compute it
            # once and train the head alone on it; same result as running the suffix every epoch.
            model, train_data, val_data = _frozen_suffix_data(full, model, reader, val_data, run.seed)
    elif mode == "online":
        reader = None
        model = full
        settings = augment_settings(augment_params)
        files, labels, _ = train_rows
        train_data = online_epochs(load_images(files, model_info(full)["image_size"]), labels, settings)
        val_data = (load_images(val_rows[0], model_info(full)["image_size"]), np.asarray(val_rows[1], np.int64))
        fingerprint["augment"] = settings
    else:
        raise ConfigError(f"augment.mode: must be cached or online, got {mode!r}")
    compile_head(model, n_classes, run.lr)
    try:
        result = training.fit(model, train_data, val_data, run.epochs, run.batch_size, run.seed, live_dir,
                              work_dir=training.work_dir_for(model_path), resume=resume,
                              fingerprint=training.rounded(fingerprint))
    finally:
        if reader is not None:
            reader.close()
    seconds = time.perf_counter() - t0
    print(f"{Path(model_path).name}: {mode} mode, {seconds / run.epochs:.1f} s/epoch", file=sys.stderr)
    save_model(detached(full), model_path)
    result.pop("history", None)
    result["mode"] = mode
    return result


# ---------------------------------------------------------------- stages

def _cache_expect(backbone, augment, compute, class_names) -> dict:
    """The cache attrs the current params imply (boundary/unfreeze_from checked by the caller)."""
    from tlpipe.features import backbones
    from tlpipe.features.augment import augment_settings

    return {"backbone": backbone.name, "weights": backbone.weights, "image_size": backbone.image_size,
            "preprocessing": backbones.preprocessing_name(backbone.name, backbone.weights),
            "precision": compute.precision, "views": int(augment.views),
            "augment": augment_settings(augment), "class_names": list(class_names)}


def _rows(split_dir, images_dir, part: str, classes):
    from tlpipe.features.extract import manifest_rows

    return manifest_rows(Path(split_dir) / f"{part}.csv", images_dir, classes)


def run_head_aug(*, cache, split_dir, images_dir, model_out, metrics_out, live_dir, backbone, compute,
                 head, head_aug, augment, resume: bool = False) -> dict:
    """train_head_aug: a fresh head on the frozen base, trained on augmented images; saves the full model."""
    from tlpipe.features.extract import read_class_names
    from tlpipe.train.loop import write_json

    classes = read_class_names(Path(split_dir) / "classes.json")
    full = new_model(backbone, compute.precision, head.units, head.dropout, head_aug.seed, classes)
    kwargs = _mode_kwargs(augment, cache, split_dir, images_dir, classes,
                          _cache_expect(backbone, augment, compute, classes))
    result = train(full, augment.mode, RunSettings.from_params(head_aug), live_dir=live_dir, model_path=model_out,
                   resume=resume, **kwargs)
    write_json(metrics_out, result)
    return result


def run_finetune(*, cache, split_dir, images_dir, model_in, model_out, metrics_out, live_dir, backbone,
                 compute, augment, finetune, resume: bool = False) -> dict:
    """finetune: the model of `model_in`, base trainable from finetune.unfreeze_from, trained jointly."""
    from tlpipe.features.extract import read_class_names
    from tlpipe.model.saved import model_info
    from tlpipe.train.loop import write_json

    classes = read_class_names(Path(split_dir) / "classes.json")
    full = finetune_model(model_in, backbone, compute.precision, finetune.unfreeze_from)
    if model_info(full)["class_names"] != list(classes):
        raise ModelFileError(f"{model_in}: trained for classes {model_info(full)['class_names']}, the split has "
                             f"{classes}; rerun the stage that writes it")
    expect = _cache_expect(backbone, augment, compute, classes)
    expect["unfreeze_from"] = finetune.unfreeze_from
    kwargs = _mode_kwargs(augment, cache, split_dir, images_dir, classes, expect)
    result = train(full, augment.mode, RunSettings.from_params(finetune), live_dir=live_dir,
                   model_path=model_out, resume=resume, **kwargs)
    result["trainable_from"] = finetune.unfreeze_from
    write_json(metrics_out, result)
    return result


def _mode_kwargs(augment, cache, split_dir, images_dir, classes, expect) -> dict:
    if augment.mode == "cached":
        return {"cache_path": cache, "expect": expect}
    return {"train_rows": _rows(split_dir, images_dir, "train", classes),
            "val_rows": _rows(split_dir, images_dir, "validation", classes), "augment_params": augment}
