"""The training-data interface `loop.fit` takes, and its simplest source, stored features.

Each gives `epoch(e)`: the training data of epoch e (0-based), as (x, y) arrays that fit shuffles
by `loop.epoch_order`; `validation()`: (x, y) arrays; `n_train`: the rows of an epoch; and `fingerprint`: what identifies the data,
which a checkpoint must match to be resumed. An epoch depends on (seed, e) alone, so a resumed run
sees the batches an uninterrupted one would.

One source per module, so a stage depends only on the code of the data it reads:
- trainingdata.StoredFeatures: the extract stage's features (train_head): the same arrays every epoch.
- views.CachedViews: the view cache's boundary activations (finetune, cached mode): each epoch
  shows every training image as one of its cached views (`views.epoch_views`).
- views.FrozenSuffix: CachedViews run through a frozen suffix once (train_head_aug, cached mode):
  the pooled features per view, so only the head trains; the same numbers as running the suffix
  every epoch.
- online.OnlineAugmented: images augmented afresh, view = epoch (both stages in augment.mode online).
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import numpy as np


class TrainingData(Protocol):
    fingerprint: dict
    n_train: int

    def epoch(self, e: int): ...

    def validation(self) -> tuple: ...


class Closing:
    """Sources are context managers; close() frees what they hold open (none by default)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def digest(*arrays) -> str:
    """SHA-256 of arrays' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


class StoredFeatures(Closing):
    """Fixed (x, y) arrays for training and for validation."""

    def __init__(self, train: tuple, validation: tuple):
        self.train, self.val = train, validation
        self.n_train = len(train[1])
        self.fingerprint = {"data": digest(*train, *validation)}

    def epoch(self, e: int) -> tuple:
        return self.train

    def validation(self) -> tuple:
        return self.val
