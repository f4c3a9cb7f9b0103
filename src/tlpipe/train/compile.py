"""The optimizer and loss every training stage uses: RMSprop on integer class labels, its loss scaled
where layers compute in float16 (compute.precision: mixed_float16)."""

from __future__ import annotations

from tlpipe.errors import ConfigError


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
