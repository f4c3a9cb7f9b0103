"""Any user's image file as a model input, decoded as training decoded the image store's files.

Apart from inputs.py (the store's tf.data pipelines, which every computing stage runs) because it
needs the data stage's decoder (data/images.py): only prediction and the augmentation preview use it,
so an edit to the data stage's decoding reruns neither the features nor the training.
"""

from __future__ import annotations

from tlpipe.data.images import normalise
from tlpipe.features.inputs import decode_resized


def decode_file(path, image_size: int):
    """Any user's image file -> float32 (image_size, image_size, 3), RGB 0..255, as training saw it:
    `images.normalise` gives the bytes the data stage would store (EXIF rotation applied, CMYK, greyscale
    and transparency converted), then the pipeline's own decode and resize. ImageDecodeError (a
    DataError naming the file) when it is not a usable image."""
    return decode_resized(normalise(path).data, image_size).numpy()
