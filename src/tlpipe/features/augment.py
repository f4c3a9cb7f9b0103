"""Data augmentation: seeded random affine transforms of training images (the preview grid is in
augment_preview.py).

Every transform of one image (rotation, shift, shear, zoom, flip) is composed into ONE affine matrix
and applied with a single bilinear resample (tf's ImageProjectiveTransformV3, the op under Keras 3's
RandomRotation/RandomTranslation/RandomShear/RandomZoom): one interpolation instead of four, and the
same fill_mode semantics as those layers.

Randomness is stateless and keyed per image: view `v` of image `i` under seed `s` is always the same
picture, whatever the batch size, order, or whether a run was interrupted and resumed. The online
training mode uses the epoch as the view number; the cache stores views 0..views-1.

Units (see docs/augmentation.md):
    rotation_range      degrees, angle uniform in [-r, r]
    width_shift_range   fraction of the width, shift uniform in [-f*W, f*W] pixels
    height_shift_range  fraction of the height
    shear_range         shear FACTOR (tan of the shear angle), uniform in [-s, s]; x += factor * y
    zoom_range          content magnification uniform in [1-z, 1+z] (>1 zooms in), same on both axes
    horizontal_flip     mirror left-right with probability 1/2
    fill_mode           nearest | reflect | wrap | constant (0) for pixels coming from outside
"""

from __future__ import annotations

import math

import tensorflow as tf


_DEFAULTS = dict(rotation_range=0.0, width_shift_range=0.0, height_shift_range=0.0, shear_range=0.0,
                 zoom_range=0.0, horizontal_flip=False, fill_mode="nearest", seed=0)


def augment_settings(params) -> dict:
    """The transform settings from an `augment` params section (pydantic model, namespace or dict);
    missing keys take neutral defaults (no transform). The bounds are config.AugmentParams' (validated
    when params.yaml is read): trusted here. The types are made plain (float, bool, int), because the
    dict goes into fingerprints and file attributes, where 40 and 40.0 would differ."""
    get = params.get if isinstance(params, dict) else (lambda k, d: getattr(params, k, d))
    s = {k: get(k, d) for k, d in _DEFAULTS.items()}
    for k in ("rotation_range", "width_shift_range", "height_shift_range", "shear_range", "zoom_range"):
        s[k] = float(s[k])
    s["horizontal_flip"] = bool(s["horizontal_flip"])
    s["seed"] = int(s["seed"])
    return s


def image_seeds(seed: int, views, indices) -> tf.Tensor:
    """Per-image stateless seeds [B, 2] (int64) for view(s) `views` of images `indices`."""
    indices = tf.cast(tf.convert_to_tensor(indices), tf.int64)
    views = tf.broadcast_to(tf.cast(views, tf.int64), tf.shape(indices))
    # Collision-free for index < 2**32: (seed, view, index) -> one Philox key pair.
    second = views * (2 ** 32) + indices
    return tf.stack([tf.fill(tf.shape(indices), tf.constant(seed, tf.int64)), second], axis=1)


def random_transforms(settings: dict, seeds, height: int, width: int) -> tf.Tensor:
    """Projective transforms [B, 8] (output pixel -> input pixel, tf's convention), one per seed.

    All six random draws are made whatever is enabled, so turning one transform on or off does not
    change the others."""
    u = tf.map_fn(lambda s: tf.random.stateless_uniform([6], seed=s, minval=-1.0, maxval=1.0),
                  tf.convert_to_tensor(seeds, tf.int64), fn_output_signature=tf.float32)
    theta = u[:, 0] * (settings["rotation_range"] * math.pi / 180.0)
    dx = u[:, 1] * (settings["width_shift_range"] * width)
    dy = u[:, 2] * (settings["height_shift_range"] * height)
    shear = u[:, 3] * settings["shear_range"]
    zoom = 1.0 + u[:, 4] * settings["zoom_range"]
    flip = tf.where((u[:, 5] < 0.0) & settings["horizontal_flip"], -1.0, 1.0)
    # Forward map p_out = c + R Sh Z F (p_in - c) + t; we need its inverse
    # p_in = c + M (p_out - c - t) with M = F Z^-1 Sh^-1 R^-1.
    cos, sin = tf.cos(theta), tf.sin(theta)
    # Sh^-1 R^-1 = [[1, -s], [0, 1]] @ [[cos, sin], [-sin, cos]]
    a00, a01 = cos + shear * sin, sin - shear * cos
    a10, a11 = -sin, cos
    m00, m01 = flip * a00 / zoom, flip * a01 / zoom
    m10, m11 = a10 / zoom, a11 / zoom
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    qx, qy = -cx - dx, -cy - dy  # p_out - c - t at p_out = 0
    b0 = cx + m00 * qx + m01 * qy
    b1 = cy + m10 * qx + m11 * qy
    zeros = tf.zeros_like(theta)
    return tf.stack([m00, m01, b0, m10, m11, b1, zeros, zeros], axis=1)


def apply_transforms(images, transforms, fill_mode: str) -> tf.Tensor:
    """Resample a batch [B, H, W, C] with projective transforms [B, 8] (bilinear, fill value 0)."""
    images = tf.convert_to_tensor(images)
    dtype = images.dtype
    h, w = images.shape[1], images.shape[2]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32), transforms=tf.cast(transforms, tf.float32),
        output_shape=tf.constant([h, w], tf.int32), fill_value=tf.constant(0.0),
        interpolation="BILINEAR", fill_mode=fill_mode.upper())
    return tf.cast(out, dtype)


def augment_images(images, seeds, settings: dict) -> tf.Tensor:
    """Augment a batch [B, H, W, C] (float, any range) with one transform per row of `seeds` [B, 2]."""
    images = tf.convert_to_tensor(images)
    transforms = random_transforms(settings, seeds, images.shape[1], images.shape[2])
    return apply_transforms(images, transforms, settings["fill_mode"])
