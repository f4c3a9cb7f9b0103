"""The dense classifier head trained on stored features (Chollet ch. 5: Dense -> Dropout -> Dense)."""

from __future__ import annotations

import keras

from tlpipe.errors import ConfigError

# Layer names are part of the model format: modelio copies and finds the head by them.
HEAD_LAYERS = ("head_dense", "head_dropout", "head_out")


def build_head(input_dim: int, n_classes: int, units: int = 256, dropout: float = 0.5, seed: int = 42) -> keras.Model:
    """Features (N x input_dim) -> class probabilities.

    Two classes: one sigmoid unit giving P(class index 1), as in the book. More: a softmax.
    Initialisers and dropout are seeded here so the head does not depend on global RNG state.
    """
    if int(n_classes) < 2:
        raise ConfigError(f"the head needs at least 2 classes, got {n_classes}; check the data split's classes")
    if int(input_dim) < 1:
        raise ConfigError(f"the head's input dimension must be positive, got {input_dim}")
    if int(units) < 1:
        raise ConfigError(f"head.units must be a positive integer, got {units}")
    if not 0 <= float(dropout) < 1:
        raise ConfigError(f"head.dropout must be in [0, 1), got {dropout}")
    binary = int(n_classes) == 2
    inputs = keras.Input(shape=(int(input_dim),), name="features")
    x = keras.layers.Dense(
        int(units), activation="relu", name=HEAD_LAYERS[0],
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
    )(inputs)
    x = keras.layers.Dropout(float(dropout), seed=seed + 1, name=HEAD_LAYERS[1])(x)
    # The output layer computes in float32 even under a bfloat16 policy: probabilities need the range.
    outputs = keras.layers.Dense(
        1 if binary else int(n_classes), activation="sigmoid" if binary else "softmax",
        name=HEAD_LAYERS[2], dtype="float32",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 2),
    )(x)
    return keras.Model(inputs, outputs, name="head")


def is_binary(model: keras.Model) -> bool:
    """True when the model ends in one sigmoid unit (P(class 1)) rather than a softmax."""
    return int(model.outputs[0].shape[-1]) == 1


def loss_for(n_classes: int) -> str:
    """Labels are integer class indices: binary cross-entropy on 0/1, else sparse categorical."""
    return "binary_crossentropy" if int(n_classes) == 2 else "sparse_categorical_crossentropy"


def compile_head(model: keras.Model, n_classes: int, lr: float) -> keras.Model:
    """RMSprop(lr) with the loss matching the output; 'accuracy' resolves to binary/sparse accuracy."""
    if not float(lr) > 0:
        raise ConfigError(f"learning rate must be positive, got {lr}")
    model.compile(
        optimizer=keras.optimizers.RMSprop(learning_rate=float(lr)),
        loss=loss_for(n_classes),
        metrics=["accuracy"],
    )
    return model


# ---------------------------------------------------------------- the train_head stage

# Feature-file attrs that must agree between the train and validation files (and the saved model).
AGREE_KEYS = ("backbone", "weights", "weights_sha256", "layer", "pooling", "image_size", "preprocessing",
              "class_names")


def check_attrs_agree(files_attrs: dict) -> dict:
    """{path: attrs} -> the shared attrs; FeatureFileError naming the key and both files if they differ."""
    from tlpipe.errors import FeatureFileError

    (first, ref), *rest = files_attrs.items()
    for path, attrs in rest:
        for key in AGREE_KEYS:
            if attrs.get(key) != ref.get(key):
                raise FeatureFileError(
                    f"{path} has {key}={attrs.get(key)!r} but {first} has {ref.get(key)!r}: they come from "
                    f"different extract runs; rerun the extract stage (`dvc repro extract`)"
                )
    return {k: ref.get(k) for k in AGREE_KEYS}


def _digest(*arrays) -> str:
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def base_for(attrs: dict, precision: str = "float32"):
    """The convolutional base the features came from, rebuilt, its weights file checked unchanged."""
    from tlpipe.features import backbones
    from tlpipe.errors import FeatureFileError

    base = backbones.build_base(attrs["backbone"], attrs["weights"], int(attrs["image_size"]), precision)
    now = backbones.weights_sha256(attrs["backbone"], attrs["weights"], int(attrs["image_size"]))
    if (now or None) != (attrs.get("weights_sha256") or None):
        raise FeatureFileError(
            f"backbone weights {attrs['weights']!r} changed since the features were extracted (SHA-256 "
            f"{attrs.get('weights_sha256')} then, {now} now); rerun the extract stage (`dvc repro extract`)"
        )
    return base


def check_backbone(path, attrs: dict, backbone) -> None:
    """FeatureFileError listing every attr of `path` that differs from params.backbone."""
    from tlpipe.features.backbones import default_layer
    from tlpipe.errors import FeatureFileError

    want = {"name": ("backbone", backbone.name), "weights": ("weights", backbone.weights),
            "layer": ("layer", backbone.layer or default_layer(backbone.name)),
            "pooling": ("pooling", backbone.pooling), "image_size": ("image_size", int(backbone.image_size))}
    diffs = [(key, attr, attrs.get(attr), value) for key, (attr, value) in want.items() if attrs.get(attr) != value]
    if diffs:
        made = ", ".join(f"{attr}={got!r}" for _, attr, got, _ in diffs)
        asked = ", ".join(f"backbone.{key}={value!r}" for key, _, _, value in diffs)
        raise FeatureFileError(f"{path}: made with {made} but params.yaml has {asked}; "
                               f"rerun the extract stage (`dvc repro extract`)")


def run_train_head(features_dir, model_out, metrics_out, live_dir, head, resume: bool = False,
                   backbone=None) -> dict:
    """train_head stage: the dense head on stored features, saved as a full model (modelio format).

    `head`: params.head (units, dropout, lr, epochs, batch_size, seed); `backbone`: params.backbone,
    which the feature files must match (None: not checked). Writes `model_out` and the metrics JSON
    (training.fit's summary without the per-epoch history); returns the metrics.
    """
    from pathlib import Path

    from tlpipe.errors import FeatureFileError
    from tlpipe.features.extract import read_features
    from tlpipe.model.saved import assemble, save_model
    from tlpipe.train.loop import fit, work_dir_for, write_json

    features_dir = Path(features_dir)
    paths = {part: features_dir / f"{part}.h5" for part in ("train", "validation")}
    data = {part: read_features(p) for part, p in paths.items()}
    if backbone is not None:
        for part, p in paths.items():
            check_backbone(p, data[part][3], backbone)
    attrs = check_attrs_agree({str(paths[part]): data[part][3] for part in paths})
    classes = list(attrs["class_names"])
    for part, (x, y, _, _) in data.items():
        if len(y) == 0:
            raise FeatureFileError(f"{paths[part]}: holds no samples; check the data split (data.split)")
        if y.min() < 0 or y.max() >= len(classes):
            raise FeatureFileError(f"{paths[part]}: labels outside 0..{len(classes) - 1}; rerun the extract stage")
    (xt, yt, _, _), (xv, yv, _, _) = data["train"], data["validation"]
    if xt.shape[1] != xv.shape[1]:
        raise FeatureFileError(f"{paths['train']} has {xt.shape[1]} features per image, {paths['validation']} "
                               f"{xv.shape[1]}; rerun the extract stage (`dvc repro extract`)")

    model = compile_head(build_head(xt.shape[1], len(classes), head.units, head.dropout, seed=head.seed),
                         len(classes), head.lr)
    # What a checkpoint must match besides the model's shapes: the data and every head setting.
    fingerprint = {"lr": float(head.lr), "units": int(head.units), "dropout": float(head.dropout),
                   "data": _digest(xt, yt, xv, yv)}
    result = fit(model, (xt, yt), (xv, yv), head.epochs, head.batch_size, head.seed, live_dir,
                 work_dir=work_dir_for(model_out), resume=resume, fingerprint=fingerprint)

    info = {**attrs, "trainable_from": None}
    full = assemble(base_for(attrs), attrs["layer"], attrs["pooling"], model, info, name="head")
    save_model(full, model_out)
    metrics = {k: v for k, v in result.items() if k != "history"}
    write_json(metrics_out, metrics)
    return metrics
