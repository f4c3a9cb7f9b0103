"""The view cache's file format: `features/views.h5` (built by features/viewcache.py), and reading it.

File layout (`features/views.h5`, its activations in `features/views.shards/`, see shards.py):
    /train/activations       float16 [N, views, h, w, c]   view v of image i = augment view v
                             (a virtual dataset over views.shards/train-000000.h5, ...)
    /train/labels            int64 [N];   /train/paths  utf-8 [N]
    /validation/..., /test/...  activations [N, h, w, c] of the plain (never augmented) images
    attrs: tlpipe_format, kind="views", mode, backbone, weights, weights_sha256, image_size,
           preprocessing, precision, boundary, unfreeze_from, views, augment (JSON), class_names (JSON),
           shards_sha256 (of views.shards/manifest.json)

In `augment.mode: online` the file is a marker: the same attrs, no groups (online training reads
the images themselves, and dvc.yaml cannot make the stage conditional); the shard folder is empty.

Its own module, apart from the builder, so the training stages that read the cache do not depend on
how it is computed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tlpipe import atomic
from tlpipe.runtime.errors import FeatureFileError
from tlpipe.features import shards

FORMAT = 1
KIND = "views"
RERUN = "rerun the viewcache stage (dvc repro viewcache)"


def write_table(out: Path, attrs: dict, parts: dict, tables: dict, manifest_sha256: str | None,
                activation_dtype) -> None:
    """The table file: `attrs` (CacheSpec.attrs), and per part a virtual `activations` over its shards
    (`tables[part]`: shape and (start, rows, file) of each shard), labels and paths; under a temp name,
    then renamed."""
    import h5py

    folder = shards.shards_dir(out).name
    with atomic.target(out) as tmp:
        with h5py.File(tmp, "w", libver=("earliest", "v110")) as f:
            for k, v in attrs.items():
                f.attrs[k] = v
            if manifest_sha256 is not None:
                f.attrs["shards_sha256"] = manifest_sha256
            for part, (files, labels, paths) in parts.items():
                if part not in tables:
                    continue
                g = f.create_group(part, track_order=False)
                shape, pieces = tables[part]
                shards.create_virtual(g, "activations", shape, activation_dtype,
                                      [(start, rows, f"{folder}/{name}") for start, rows, name in pieces])
                g.create_dataset("labels", data=np.asarray(labels, np.int64), track_times=False)
                g.create_dataset("paths", data=np.asarray([str(p) for p in paths], dtype=object),
                                 dtype=h5py.string_dtype("utf-8"), track_times=False)


def read_attrs(path) -> dict:
    """The cache's attrs (decoded); FeatureFileError when missing or not a view cache."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"{path}: view cache not found; run the viewcache stage (dvc repro viewcache)")
    try:
        with h5py.File(path, "r") as f:
            attrs = shards.plain_attrs(f.attrs)
    except OSError as e:
        raise FeatureFileError(f"{path}: not a readable HDF5 view cache ({e}); delete it and rerun "
                               f"the viewcache stage") from None
    if attrs.get("kind") != KIND or int(attrs.get("tlpipe_format", -1)) != FORMAT:
        raise FeatureFileError(f"{path}: not a tlpipe view cache of format {FORMAT}; rerun the viewcache stage")
    if "shards_sha256" in attrs:  # the activations live in the shard folder beside the file
        shards.check(path, attrs["shards_sha256"], RERUN)
    attrs["augment"] = json.loads(attrs["augment"])
    attrs["class_names"] = json.loads(attrs["class_names"])
    return attrs


def check_attrs(path, attrs: dict, expect: dict) -> None:
    """FeatureFileError naming every attr that differs from `expect` (what the caller is configured for)."""
    bad = [f"{k}: file has {attrs.get(k)!r}, params say {v!r}" for k, v in expect.items()
           if v is not None and attrs.get(k) != v]
    if bad:
        raise FeatureFileError(f"{path}: the view cache was built with other settings ({'; '.join(bad)}); "
                               f"rerun the viewcache stage (dvc repro viewcache)")


def load_part(path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """(activations float16, labels) of a plain part (validation/test), in memory."""
    import h5py

    read_attrs(path)  # a missing shard would read as zeros
    with h5py.File(path, "r") as f:
        if part not in f:
            raise FeatureFileError(f"{path}: has no {part!r} part (built in online mode?); rerun viewcache "
                                   f"with augment.mode: cached")
        return f[part]["activations"][...], f[part]["labels"][...]


class ViewReader:
    """Reads the training views of a cache, one epoch at a time."""

    def __init__(self, path):
        import h5py

        self.path = Path(path)
        self.attrs = read_attrs(path)
        self._f = h5py.File(self.path, "r")
        if "train" not in self._f:
            raise FeatureFileError(f"{path}: has no training views (built in online mode?); rerun viewcache "
                                   f"with augment.mode: cached")
        self._acts = self._f["train"]["activations"]
        self.labels = self._f["train"]["labels"][...]
        self.n, self.views = int(self._acts.shape[0]), int(self._acts.shape[1])
        self.activation_shape = tuple(self._acts.shape[2:])

    def read_views(self, view: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(activations [N, h, w, c] float32, labels): view `view[i]` of each image i, in file order
        (which view an epoch shows is training's rule: train.views.epoch_views)."""
        out = np.empty((self.n,) + self.activation_shape, self._acts.dtype)
        for i in range(self.n):
            self._acts.read_direct(out, np.s_[i, view[i]], np.s_[i])
        return out.astype(np.float32), self.labels.copy()

    def map_views(self, fn, batch_size: int = 64) -> np.ndarray:
        """fn applied to every stored view: [N, views, ...] (float32), reading a few images at a time."""
        out = None
        for start, stop in shards.ranges(self.n, batch_size):
            block = self._acts[start:stop].astype(np.float32)
            y = np.asarray(fn(block.reshape((-1,) + self.activation_shape)), np.float32)
            if out is None:
                out = np.empty((self.n, self.views) + y.shape[1:], np.float32)
            out[start:stop] = y.reshape((stop - start, self.views) + y.shape[1:])
        return out

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
