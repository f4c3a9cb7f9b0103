"""tf.data input pipelines: image files on disk -> batches of (preprocessed) square RGB images.

Decoding, resizing and preprocessing run natively in tf.data, in parallel, while the model works on
the previous batch (prefetch). `deterministic=True` keeps the file order whatever the parallelism,
so row i of every output is file i.

Resizing is bilinear without antialiasing (as Keras' `image_dataset_from_directory` and the book's
`ImageDataGenerator(target_size=...)` do), stretching to the square size without keeping the
aspect ratio.
"""

from __future__ import annotations

from typing import Sequence

from tlpipe.features.backbones import preprocess


def read_resized(path, image_size: int):
    """One image file of the store -> float32 (image_size, image_size, 3), RGB 0..255. Pure TensorFlow."""
    import tensorflow as tf

    return decode_resized(tf.io.read_file(path), image_size)


def decode_resized(data, image_size: int):
    """Encoded image bytes -> float32 (image_size, image_size, 3), RGB 0..255: the one decode and
    resize every model input goes through (training, evaluation, prediction)."""
    import tensorflow as tf

    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=False)
    # resize returns float32 already; clip guards against tiny bilinear overshoot outside 0..255.
    return tf.clip_by_value(image, 0.0, 255.0)


def image_dataset(
    files: Sequence[str],
    image_size: int,
    batch_size: int,
    preprocess_mode: str | None,
    labels: Sequence[int] | None = None,
):
    """A tf.data.Dataset of image batches (with int64 label batches when `labels` is given), in file order.

    `preprocess_mode`: a mode of `tlpipe.features.backbones.preprocess` ("caffe", "hed-caffe", "tf", ...), or
    None for raw float 0..255 images (for models that preprocess inside, like tlpipe's saved models).
    """
    import tensorflow as tf

    files = [str(f) for f in files]
    if labels is not None and len(labels) != len(files):
        raise ValueError(f"{len(labels)} labels for {len(files)} files")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive (got {batch_size})")

    def load(path):
        return preprocess(read_resized(path, image_size), preprocess_mode)

    paths = tf.data.Dataset.from_tensor_slices(tf.constant(files, dtype=tf.string))
    images = paths.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if labels is not None:
        label_ds = tf.data.Dataset.from_tensor_slices(tf.constant(list(labels), dtype=tf.int64))
        images = tf.data.Dataset.zip((images, label_ds))
    return images.batch(batch_size).prefetch(tf.data.AUTOTUNE)
