"""The optimizer and loss every training stage uses: RMSprop on integer class labels."""

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
    model.compile(
        optimizer=keras.optimizers.RMSprop(learning_rate=float(lr)),
        loss=loss_for(n_classes),
        metrics=["accuracy"],
    )
    return model
