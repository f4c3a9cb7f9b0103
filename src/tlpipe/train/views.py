"""Training data from the view cache: the boundary activations of each view (finetune, cached mode),
or their pooled output through a frozen suffix (train_head_aug, cached mode). See tlpipe.train.trainingdata."""

from __future__ import annotations

import time

import numpy as np

from tlpipe.runtime.log import log
from tlpipe.train.trainingdata import Closing


def epoch_views(n: int, views: int, seed: int, epoch: int) -> np.ndarray:
    """The view each image shows in `epoch`, seeded by (seed, epoch) alone, so resuming repeats it.

    Each image walks through a random permutation of its views, a fresh one every `views` epochs:
    no view repeats before all have been shown, so with `views >= epochs` every epoch sees new
    augmentations, as online training does. (loop.fit shuffles the order itself.)"""
    cycle, position = divmod(int(epoch), int(views))
    keys = np.random.default_rng([int(seed), cycle, 1]).random((n, views))
    return np.argsort(keys, axis=1, kind="stable")[:, position]


class CachedViews(Closing):
    """The view cache at `path`: epoch e shows each training image as the view `epoch_views` picks.
    `expect`: attrs the cache must have (FeatureFileError naming the difference otherwise)."""

    def __init__(self, path, seed: int, expect: dict | None = None):
        from tlpipe.features import viewfile

        self.path, self.seed = path, int(seed)
        self.attrs = viewfile.read_attrs(path)
        viewfile.check_attrs(path, self.attrs, {"mode": "cached", **(expect or {})})
        x, y = viewfile.load_part(path, "validation")
        self.val = (x.astype(np.float32), y)
        self.reader = viewfile.ViewReader(path)
        self.n_train = self.reader.n
        self.fingerprint = {"mode": "cached", "cache": self.attrs}

    def epoch(self, e: int) -> tuple:
        r = self.reader
        return r.read_views(epoch_views(r.n, r.views, self.seed, e))

    def validation(self) -> tuple:
        return self.val

    def close(self) -> None:
        self.reader.close()


class FrozenSuffix(Closing):
    """`views` through the frozen suffix and pooling of `cached_model` (a models.cached_training_model),
    computed once per view: the head's inputs. `seconds`: how long that one pass took."""

    def __init__(self, views: CachedViews, cached_model):
        from tlpipe.train.models import frozen_features_model

        if cached_model.get_layer("suffix").trainable_variables:
            raise ValueError("FrozenSuffix needs a model whose suffix is frozen")
        features = frozen_features_model(cached_model)
        reader = views.reader
        t0 = time.perf_counter()
        self.features = reader.map_views(lambda x: features.predict(x, batch_size=64, verbose=0))
        val_x, val_y = views.validation()
        self.val = (features.predict(val_x, batch_size=64, verbose=0), val_y)
        self.seconds = time.perf_counter() - t0
        log.info(f"frozen suffix: pooled features of {reader.n} images x {reader.views} views in "
                 f"{self.seconds:.1f} s")
        self.labels = reader.labels.copy()
        self.n_train = len(self.labels)
        self._views = lambda e: epoch_views(reader.n, reader.views, views.seed, e)
        self.fingerprint = dict(views.fingerprint)

    def epoch(self, e: int) -> tuple:
        return self.features[np.arange(len(self.labels)), self._views(e)], self.labels

    def validation(self) -> tuple:
        return self.val
