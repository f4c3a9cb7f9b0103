"""The dense classifier head (Chollet ch. 5: Dense -> Dropout -> Dense). Training it: tlpipe.train."""

from __future__ import annotations

import keras

from tlpipe.runtime.errors import ConfigError

import numpy as np

# Layer names are part of the model format: model.saved copies and finds the head by them.
HEAD_LAYERS = ("head_dense", "head_dropout", "head_out")
# head.standardize: a Normalization layer before head_dense, its statistics fixed in its config.
HEAD_NORM = "head_norm"
# Each feature's variance is shrunk toward the features' mean variance by this fraction of it (see
# feature_stats); chosen on validation (docs/results.md, "Standardising small sets").
VARIANCE_SHRINK = 0.1


def head_layers(model) -> tuple[str, ...]:
    """The head's layer names in `model`, in order (models saved before head.standardize have no norm)."""
    names = {layer.name for layer in model.layers}
    return ((HEAD_NORM,) if HEAD_NORM in names else ()) + HEAD_LAYERS


def feature_stats(x, shrink: float = VARIANCE_SHRINK) -> tuple[list[float], list[float]]:
    """(mean, variance) per feature of the training features `x` (N x D), summed in float64 so they do not
    depend on how the rows are split.

    Each variance is the feature's own plus `shrink` times the mean over features. A feature that
    varies on only one or two training images (a ReLU that rarely fires) has a tiny variance of its own;
    divided by it, the feature's value on a new image becomes a z-score in the hundreds, and a head on
    thousands of such features (flatten features of a few dozen photos) starts with validation losses of
    5 to 100. Features well spread in training barely change. Where every feature is constant, 1."""
    x = np.asarray(x)
    mean = x.mean(axis=0, dtype=np.float64)
    var = x.var(axis=0, dtype=np.float64)
    var = var + float(shrink) * var.mean()
    var[var <= 1e-12] = 1.0
    return mean.astype(np.float32).tolist(), var.astype(np.float32).tolist()


def build_head(input_dim: int, n_classes: int, units: int = 256, dropout: float = 0.5, seed: int = 42,
               stats: tuple | None = None) -> keras.Model:
    """Features (N x input_dim) -> class probabilities.

    Two classes: one sigmoid unit giving P(class index 1), as in the book. More: a softmax.
    Initialisers and dropout are seeded here so the head does not depend on global RNG state.
    `stats`: (mean, variance) of the training features (feature_stats): the head standardises its input
    first (head.standardize), and the saved model carries them.
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
    inputs = x = keras.Input(shape=(int(input_dim),), name="features")
    if stats is not None:
        mean, variance = stats
        x = keras.layers.Normalization(mean=mean, variance=variance, name=HEAD_NORM, dtype="float32")(x)
    x = keras.layers.Dense(
        int(units), activation="relu", name=HEAD_LAYERS[0],
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
    )(x)
    x = keras.layers.Dropout(float(dropout), seed=seed + 1, name=HEAD_LAYERS[1])(x)
    # The output layer computes in float32 even under a bfloat16 or mixed_float16 policy, as Keras' mixed
    # precision guide advises: the sigmoid/softmax and the loss need float32's range and precision.
    outputs = keras.layers.Dense(
        1 if binary else int(n_classes), activation="sigmoid" if binary else "softmax",
        name=HEAD_LAYERS[2], dtype="float32",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 2),
    )(x)
    return keras.Model(inputs, outputs, name="head")
