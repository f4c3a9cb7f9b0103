"""What a saved model's outputs mean, in one place: a binary model's one sigmoid unit p is P(class 1),
so its classes' probabilities are [1 - p, p]; the predicted class is the most probable one (the first
on a tie). Evaluation, `tlpipe predict` and Grad-CAM all read outputs through here."""

from __future__ import annotations

import numpy as np

from tlpipe.runtime.errors import ModelFileError


def class_probabilities(raw: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """Model outputs -> (N, K) class probabilities; a binary model's one sigmoid unit p is P(class 1)
    and becomes the columns [1 - p, p]. With `n_classes`, outputs of another width are an error."""
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim == 1:
        raw = raw[:, None]
    if raw.shape[1] == 1 and n_classes in (None, 2):
        return np.concatenate([1.0 - raw, raw], axis=1)
    if n_classes is not None and raw.shape[1] != n_classes:
        raise ModelFileError(f"the model outputs {raw.shape[1]} values per image but names {n_classes} classes")
    return raw


def predicted_indices(raw) -> np.ndarray:
    """The predicted class index of each row of model outputs (or of class probabilities)."""
    return class_probabilities(raw).argmax(axis=1)


def class_scores(preds):
    """class_probabilities for a TensorFlow tensor, differentiable (Grad-CAM's gradient flows through)."""
    import tensorflow as tf

    preds = tf.cast(preds, tf.float32)
    if preds.shape[-1] == 1:
        return tf.concat([1.0 - preds, preds], axis=-1)
    return preds
