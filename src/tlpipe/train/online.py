"""Training data augmented while training (augment.mode online): see tlpipe.train.trainingdata."""

from __future__ import annotations

from typing import Callable

import numpy as np

from tlpipe.train.trainingdata import Closing


def load_images(files, image_size: int, batch_size: int = 64) -> np.ndarray:
    """Decoded, resized RGB 0..255 float32 images [N, S, S, 3], in file order."""
    from tlpipe.features.inputs import image_dataset

    if not len(files):
        return np.zeros((0, image_size, image_size, 3), np.float32)
    return np.concatenate([b.numpy() for b in image_dataset(files, image_size, batch_size, None)])


class OnlineAugmented(Closing):
    """Epoch e: view e of every training image, augmented afresh (`settings`: augment.augment_settings);
    validation on the plain images. `views` (epoch -> one view number per image) picks other views,
    e.g. the ones cached training draws (views.epoch_views)."""

    def __init__(self, images: np.ndarray, labels, val_images: np.ndarray, val_labels, settings: dict,
                 views: Callable | None = None):
        self.images, self.labels = images, np.asarray(labels, np.int64)
        self.n_train = len(self.labels)
        self.val = (val_images, np.asarray(val_labels, np.int64))
        self.settings, self.views = settings, views
        self.fingerprint = {"mode": "online", "augment": settings}

    @classmethod
    def from_manifests(cls, split_dir, images_dir, classes, image_size: int, settings: dict,
                       views: Callable | None = None) -> "OnlineAugmented":
        """The split's train and validation images, decoded once."""
        from pathlib import Path

        from tlpipe.data.manifests import manifest_rows

        files, labels, _ = manifest_rows(Path(split_dir) / "train.csv", images_dir, classes)
        train = load_images(files, image_size)
        val_files, val_labels, _ = manifest_rows(Path(split_dir) / "validation.csv", images_dir, classes)
        return cls(train, labels, load_images(val_files, image_size), val_labels, settings, views)

    def epoch(self, e: int) -> tuple:
        from tlpipe.features.augment import augment_images, image_seeds

        images = self.images
        view = np.full(len(images), e) if self.views is None else np.asarray(self.views(e))
        out = np.empty_like(images)
        for s in range(0, len(images), 64):
            idx = np.arange(s, min(len(images), s + 64))
            out[idx] = augment_images(images[idx], image_seeds(self.settings["seed"], view[idx], idx),
                                      self.settings).numpy()
        return out, self.labels

    def validation(self) -> tuple:
        return self.val
