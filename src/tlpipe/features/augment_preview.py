"""The augmentation preview: an image and augmented views of it as one PNG grid (the augment_preview
stage and `tlpipe augment-preview`). Apart from features/augment.py so that the stages which augment
(viewcache, training) do not depend on the grid or on PNG encoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from tlpipe import atomic
from tlpipe.features.augment import augment_images, augment_settings, image_seeds
from tlpipe.tiles import square_cols, tile_grid


def preview_grid(image: np.ndarray, settings: dict, n: int = 8, pad: int = 4) -> np.ndarray:
    """uint8 grid of `image` (top-left) followed by its augmented views 0..n-1, near-square, `pad`
    white pixels between and around the tiles."""
    views = augment_images(np.repeat(image[None], n, axis=0),
                           image_seeds(settings["seed"], tf.range(n), tf.zeros([n], tf.int64)),
                           settings).numpy()
    tiles = np.stack([np.clip(np.round(t), 0, 255).astype(np.uint8) for t in [image, *views]])
    return tile_grid(tiles, square_cols(len(tiles)), pad=pad, pad_value=255, border=pad)


def preview(image_path, out_png, augment_params, n: int = 8, image_size: int = 150) -> Path:
    """Write a PNG grid: the image (resized to image_size) and n augmented versions of it."""
    from PIL import Image

    from tlpipe.data.images import encode_png
    from tlpipe.features.imagefile import decode_file

    settings = augment_settings(augment_params)
    # Normalised as the data stage would store it: a user's EXIF-rotated or CMYK photo shows upright.
    grid = preview_grid(decode_file(image_path, image_size), settings, n)
    return atomic.write_bytes(out_png, encode_png(Image.fromarray(grid, "RGB")))
