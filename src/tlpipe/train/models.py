"""The models the training stages build: a new head on the frozen base (train_head_aug), a saved model
with its base unfrozen from a layer on (finetune), the part of a model after the view cache's boundary
(cached training), and a copy of a model to save."""

from __future__ import annotations

from tlpipe.runtime.errors import ConfigError, FeatureFileError, ModelFileError


def cached_training_model(full, boundary: str):
    """Boundary activations -> probabilities, sharing the suffix, pool and head layers of `full`."""
    import keras

    from tlpipe.model.dense_head import head_layers

    base = full.get_layer("base")
    try:
        start = base.get_layer(boundary)
    except ValueError:
        raise FeatureFileError(f"the model's base has no layer {boundary!r} (the cache's boundary); rebuild "
                               f"the cache for this model (dvc repro viewcache)") from None
    if start is base.layers[-1]:  # nothing of the kept base lies after the boundary
        raise ConfigError(f"finetune.unfreeze_from: the view cache's boundary {boundary!r} is the last layer the "
                          f"model keeps (backbone.layer: {boundary}), so unfreeze_from lies after the cut; choose "
                          f"auto or a layer up to {boundary}, then rerun the viewcache stage")
    try:
        suffix = keras.Model(start.output, base.output, name="suffix")
    except ValueError:
        raise ConfigError(f"finetune.unfreeze_from: the model cannot be split after {boundary!r} (a residual "
                          f"connection crosses it); choose a layer that starts a block") from None
    x = inputs = keras.Input(shape=tuple(start.output.shape[1:]), name="activations",
                             dtype=start.output.dtype)
    x = full.get_layer("pool")(suffix(x))
    for name in head_layers(full):
        x = full.get_layer(name)(x)
    return keras.Model(inputs, x, name=f"{full.name}_from_{boundary}")


def frozen_features_model(cached_model):
    """Boundary activations -> pooled features, for a cached training model whose suffix is frozen."""
    import keras

    inputs = keras.Input(shape=tuple(cached_model.inputs[0].shape[1:]), dtype=cached_model.inputs[0].dtype)
    x = cached_model.get_layer("pool")(cached_model.get_layer("suffix")(inputs))
    return keras.Model(inputs, x, name="frozen_features")


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


def new_model(backbone, precision: str, units: int, dropout: float, seed: int, class_names, base=None,
              stats=None):
    """A full model with a fresh head (seeded) on the frozen base (`backbone`: params.backbone with the
    cut); `stats`: the head standardises its input with them (model.dense_head.build_head)."""
    from tlpipe.features import backbones, pretrained
    from tlpipe.model.dense_head import build_head
    from tlpipe.model.saved import assemble, truncate_base

    if base is None:
        base = pretrained.build_base(backbone.name, backbone.weights, backbone.image_size, precision)
    layer = backbones.resolve_layer(base, backbone.layer)
    width = backbones.pooled_width(truncate_base(base, layer).output.shape[1:], backbone.pooling)
    with backbones.dtype_policy(precision):
        head = build_head(width, len(class_names), units, dropout, seed=int(seed), stats=stats)
    info = _info(backbone, class_names, layer, None)
    return assemble(base, layer, backbone.pooling, head, info, name="head_aug")


def _info(backbone, class_names, layer, trainable_from) -> dict:
    from tlpipe.features import backbones, pretrained

    return {"class_names": list(class_names), "image_size": backbone.image_size, "backbone": backbone.name,
            "weights": backbone.weights,
            "weights_sha256": pretrained.weights_sha256(backbone.name, backbone.weights, backbone.image_size),
            "layer": layer, "pooling": backbone.pooling,
            "preprocessing": backbones.preprocessing_name(backbone.name, backbone.weights),
            "trainable_from": trainable_from}


def finetune_model(start_path, backbone, precision: str, unfreeze_from: str):
    """The model of `start_path` rebuilt under `precision`, base trainable from `unfreeze_from` on
    (`auto`: the last block the model's base keeps; the name used is its info's trainable_from)."""
    from tlpipe.features import pretrained
    from tlpipe.model.saved import assemble, head_submodel, load_model, model_info, set_trainable_from

    start = load_model(start_path)
    info = model_info(start)
    for key, param in (("backbone", "name"), ("weights", "weights"), ("image_size", "image_size"),
                       ("pooling", "pooling")):
        if info[key] != getattr(backbone, param):
            raise ModelFileError(f"{start_path}: built with {key} {info[key]!r} but params.yaml has "
                                 f"backbone.{param}: {getattr(backbone, param)!r}; rerun the stage that writes it")
    base = pretrained.build_base(info["backbone"], "none", info["image_size"], precision)
    from tlpipe.features.boundary import resolve_unfreeze

    unfreeze_from = resolve_unfreeze(info["backbone"], base, info["layer"], unfreeze_from)  # against the layer the model keeps
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
