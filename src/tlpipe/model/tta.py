"""Test-time augmentation: a model's outputs averaged over each image and its mirror image.

The training views include the horizontal flip (augment.horizontal_flip), so the mirror image is one
the models learnt to classify, and the average of the two outputs is a cheap ensemble: on the
validation splits of both shared data sets it lowered the log loss and raised the accuracy of every
model, head, head_aug and fine-tuned (bench/tta.py, docs/results.md). Outputs are class
probabilities (sigmoid or softmax units), so averaging them averages the probabilities.
"""

from __future__ import annotations

import numpy as np

from tlpipe.config.choices import AUTO

MIRROR, NONE = "mirror", "none"


def resolve(tta: str, horizontal_flip: bool) -> str:
    """evaluate.tta -> mirror | none. auto: mirror where training flips images (the mirror image is then
    as much the class as the image; data whose mirror image changes the class sets horizontal_flip off)."""
    if tta == AUTO:
        return MIRROR if horizontal_flip else NONE
    return tta


def mirrored(images):
    """The horizontal mirror of a batch of NHWC images (a NumPy array or a tensor)."""
    return images[:, :, ::-1, :]


def average(plain, mirror) -> np.ndarray:
    """The mean of the outputs for the images and for their mirror images."""
    return (np.asarray(plain, dtype=np.float64) + np.asarray(mirror, dtype=np.float64)) / 2
