"""The optimizer and loss every training stage uses: RMSprop on integer class labels, its loss scaled
where layers compute in float16 (compute.precision: mixed_float16); and the learning rate per epoch
(head_aug.schedule, finetune.schedule)."""

from __future__ import annotations

import math

from tlpipe.config.choices import SCHEDULES
from tlpipe.runtime.errors import ConfigError


def learning_rates(lr: float, epochs: int, schedule: str) -> list[float]:
    """The learning rate of each epoch. constant: `lr` throughout. cosine: from `lr` in the first epoch
    down a half cosine towards 0 (never reached: the last epoch gets lr * (1 + cos(pi (E-1)/E)) / 2),
    so the last epochs take small steps and the weights settle instead of swinging from epoch to epoch.
    A function of the epoch alone, so a resumed run sets the rates an uninterrupted one would."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule: must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    epochs = int(epochs)
    if schedule == "constant":
        return [float(lr)] * epochs
    return [float(lr) * 0.5 * (1 + math.cos(math.pi * e / epochs)) for e in range(epochs)]


def loss_for(n_classes: int) -> str:
    """Labels are integer class indices: binary cross-entropy on 0/1, else sparse categorical."""
    return "binary_crossentropy" if int(n_classes) == 2 else "sparse_categorical_crossentropy"


def compile_classifier(model, n_classes: int, lr: float):
    """RMSprop(lr) with the loss matching the output; 'accuracy' resolves to binary/sparse accuracy."""
    import keras

    if not float(lr) > 0:
        raise ConfigError(f"learning rate must be positive, got {lr}")
    optimizer = keras.optimizers.RMSprop(learning_rate=float(lr))
    if computes_in_float16(model):
        # Small float16 gradients underflow to 0 without it. Keras adds it only when the model's own
        # policy is mixed_float16; ours are assembled under float32 around float16 layers.
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(
        optimizer=optimizer,
        loss=loss_for(n_classes),
        metrics=["accuracy"],
    )
    return model


def computes_in_float16(model) -> bool:
    """Whether any layer of `model`, nested models included, computes in float16."""
    layers = list(getattr(model, "layers", []))
    while layers:
        layer = layers.pop()
        if getattr(layer, "compute_dtype", None) == "float16":
            return True
        layers += getattr(layer, "layers", [])
    return False
