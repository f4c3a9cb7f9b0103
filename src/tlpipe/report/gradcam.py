"""Grad-CAM: where in the image the evidence for a class lies, and which images to show it on."""
from __future__ import annotations

import numpy as np
import pandas as pd
import tensorflow as tf
from matplotlib import colormaps

from tlpipe.runtime.errors import ConfigError, DataError
from tlpipe.model.outputs import class_scores, predicted_indices
from tlpipe.report import graph


def _input_size(model) -> tuple[int, int] | None:
    shape = model.inputs[0].shape
    return (int(shape[1]), int(shape[2])) if shape[1] and shape[2] else None


def gradcam(model, image: np.ndarray, class_index: int | None = None, layer: str | None = None):
    """Heatmap (H x W float32 in [0, 1], the image's size) of the evidence for `class_index`.

    `image`: H x W x 3, RGB 0..255 (resized to the model's input size for the forward pass).
    `class_index`: None = the predicted class. `layer`: None = the base's last conv layer.
    All zeros when nothing in the layer speaks for the class.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
    if layer is None:
        layer = graph.last_conv_layer(model).name
    elif graph.get_base_layer(model, layer) is None:
        names = ", ".join(x.name for x in graph.conv_layers(model)[-6:])
        raise ConfigError(f"visualize.gradcam_layer: no layer {layer!r} in the model; "
                          f"its last conv layers are: {names} (or use null)")
    x = tf.convert_to_tensor(image[None])
    size = _input_size(model)
    if size is not None and size != image.shape[:2]:
        x = tf.image.resize(x, size, method="bilinear")
    fwd = graph.tap(model, [layer])
    with tf.GradientTape() as tape:
        # watch the input: a frozen base has no trainable weights, so otherwise the ops producing
        # the tapped layer's output would not be recorded and its gradient would be None
        tape.watch(x)
        (conv,), preds = fwd(x)
        if class_index is None:
            class_index = int(predicted_indices(preds.numpy())[0])
        score = class_scores(preds)[:, class_index]
    grads = tape.gradient(score, conv)
    conv = tf.cast(conv, tf.float32)[0]
    weights = tf.reduce_mean(tf.cast(grads, tf.float32)[0], axis=(0, 1))  # one weight per channel
    cam = tf.nn.relu(tf.reduce_sum(conv * weights, axis=-1))
    cam = tf.image.resize(cam[..., None], image.shape[:2], method="bilinear")[..., 0].numpy()
    top = float(cam.max())
    cam = cam / top if top > 0 else np.zeros_like(cam)
    return np.clip(cam, 0.0, 1.0).astype(np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend the jet-coloured heatmap over the image: uint8 H x W x 3."""
    image = np.asarray(image, dtype=np.float32)
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape != image.shape[:2]:
        heat = tf.image.resize(heat[..., None], image.shape[:2]).numpy()[..., 0]
    jet = colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255.0
    return np.clip((1.0 - alpha) * image + alpha * jet, 0, 255).round().astype(np.uint8)


def _class_name(value, class_names: list[str]) -> str:
    """Predictions may hold class names or label indices: return the name."""
    text = str(value)
    if text in class_names:
        return text
    try:
        return class_names[int(float(text))]
    except (ValueError, IndexError):
        raise DataError(f"predictions: unknown class {text!r}; classes are {class_names}") from None


def pick_examples(pred: pd.DataFrame, class_names: list[str], per_class: int) -> pd.DataFrame:
    """Per true class: the `per_class` most confident right answers and the worst wrong ones.

    `pred` has columns path, true, predicted and p_<class> for each class (evaluation's CSV).
    Returns the chosen rows with `true`/`predicted` as names and `category` ("right"/"wrong"),
    `p_true`, `p_pred`. Ties are broken by path, so the choice is deterministic.
    """
    missing = [c for c in ["path", "true", "predicted"] + [f"p_{c}" for c in class_names]
               if c not in pred.columns]
    if missing:
        raise DataError(f"predictions CSV lacks columns {missing}; has {list(pred.columns)}")
    df = pred.copy()
    df["true"] = [_class_name(v, class_names) for v in df["true"]]
    df["predicted"] = [_class_name(v, class_names) for v in df["predicted"]]
    df["p_true"] = [float(r[f"p_{r['true']}"]) for _, r in df.iterrows()]
    df["p_pred"] = [float(r[f"p_{r['predicted']}"]) for _, r in df.iterrows()]
    picked = []
    for c in class_names:
        mine = df[df["true"] == c]
        right = mine[mine["predicted"] == c].sort_values(["p_true", "path"], ascending=[False, True])
        wrong = mine[mine["predicted"] != c].sort_values(["p_true", "path"], ascending=[True, True])
        picked.append(right.head(per_class).assign(category="right"))
        picked.append(wrong.head(per_class).assign(category="wrong"))
    return pd.concat(picked, ignore_index=True)
