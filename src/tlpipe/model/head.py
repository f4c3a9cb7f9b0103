"""The dense classifier head (Chollet ch. 5: Dense -> Dropout -> Dense). Training it: tlpipe.train."""

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
    # The output layer computes in float32 even under a bfloat16 or mixed_float16 policy, as Keras' mixed
    # precision guide advises: the sigmoid/softmax and the loss need float32's range and precision.
    outputs = keras.layers.Dense(
        1 if binary else int(n_classes), activation="sigmoid" if binary else "softmax",
        name=HEAD_LAYERS[2], dtype="float32",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 2),
    )(x)
    return keras.Model(inputs, outputs, name="head")
