"""The feature-file format: `features/<split>.h5`, what the extract stage writes and the stages after
it read (docs/design.md, "Files between stages").

    features    float32 [N, D]   a virtual dataset over `<split>.shards/` (features/shards.py)
    labels      int64 [N];   paths  utf-8 [N]
    attrs       backbone, weights, weights_sha256, layer, pooling, image_size, preprocessing,
                class_names (JSON), tlpipe_format, shards_sha256 (of the shard folder's manifest)

Its own module, apart from the extractor, so the stages that only read features (training,
evaluation) do not rerun when the way they are computed changes. HDF5 bytes are deterministic: no
timestamps (`track_times=False`), fixed dtypes, no compression, attributes written in a fixed order.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from tlpipe import atomic
from tlpipe.runtime.errors import FeatureFileError
from tlpipe.features import shards

FORMAT = 1
EXPECT_KEYS = ("backbone", "weights", "layer", "pooling", "image_size", "class_names")
RERUN = "rerun the extract stage (`dvc repro extract`)"


def file_attrs(*, backbone: str, weights: str, weights_sha256: str | None, layer: str, pooling: str,
               image_size: int, preprocessing: str, class_names: Sequence[str]) -> dict:
    """The attributes of a feature file, in the order they are written (`shards_sha256` follows)."""
    return {
        "backbone": backbone,
        "weights": weights,
        "weights_sha256": weights_sha256 or "",
        "layer": layer,
        "pooling": pooling,
        "image_size": int(image_size),
        "preprocessing": preprocessing,
        "class_names": json.dumps(list(class_names)),
        "tlpipe_format": FORMAT,
    }


def write_table(out: Path, n: int, dim: int, entries: list[dict], labels, paths, attrs: dict) -> None:
    """The feature file, under a temp name: `features` a virtual dataset over the shard files
    (`entries`: each shard's file, start and rows; no feature bytes pass through here), labels,
    paths and attrs."""
    import h5py

    folder = shards.shards_dir(out).name
    shards.check_room(out.parent, n * 8 + sum(len(p.encode("utf-8")) + 32 for p in paths) + (1 << 20))
    try:
        with atomic.target(out) as tmp, h5py.File(tmp, "w", track_order=False) as f:
            shards.create_virtual(f, "features", (n, dim), np.float32,
                                  [(e["start"], e["rows"], f"{folder}/{e['file']}") for e in entries])
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64).reshape(n), track_times=False)
            f.create_dataset("paths", data=np.asarray(paths, dtype=object).reshape(n),
                             dtype=h5py.string_dtype("utf-8"), track_times=False)
            for key, value in attrs.items():
                f.attrs[key] = value
    except RuntimeError as exc:
        # h5py reports a failed write (disk filled up meanwhile) as RuntimeError on close.
        raise OSError(errno.EIO, f"HDF5 could not write the file: {exc}") from None


def _expected_value(key: str, value, attrs: dict):
    if key == "layer" and value is None:
        from tlpipe.features.backbones import default_layer

        return default_layer(attrs.get("backbone", ""))
    if key == "class_names":
        return list(value)
    if key == "image_size":
        return int(value)
    return value


def read_features(path, expect: dict | None = None):
    """(features float32 N x D, labels int64 N, paths list[str], attrs dict) of a feature file.

    `expect`: values the file must have been made with (keys among backbone, weights, layer, pooling,
    image_size, class_names; layer None means the backbone's default). A missing, damaged or
    mismatched file raises FeatureFileError saying to rerun the extract stage.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"{path}: feature file not found; {RERUN}")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("features", "labels", "paths") if k not in f]
            if missing:
                raise FeatureFileError(f"{path}: datasets {', '.join(missing)} missing; {RERUN}")
            attrs = shards.plain_attrs(f.attrs)
            if "shards_sha256" in attrs:  # a virtual dataset would read a missing shard as zeros
                shards.check(path, attrs["shards_sha256"], RERUN)
            features = f["features"][()]
            labels = f["labels"][()]
            paths = [p.decode() if isinstance(p, bytes) else str(p) for p in f["paths"][()]]
    except FeatureFileError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise FeatureFileError(f"{path}: damaged or not a feature file ({exc}); {RERUN}") from None

    absent = [k for k in ("tlpipe_format", *EXPECT_KEYS) if k not in attrs]
    if absent:
        raise FeatureFileError(f"{path}: attributes {', '.join(absent)} missing; {RERUN}")
    if attrs["tlpipe_format"] != FORMAT:
        raise FeatureFileError(f"{path}: format {attrs['tlpipe_format']}, this tlpipe reads format {FORMAT}; {RERUN}")
    try:
        attrs["class_names"] = json.loads(attrs["class_names"])
    except (TypeError, ValueError):
        raise FeatureFileError(f"{path}: attribute class_names is not a JSON list; {RERUN}") from None
    attrs["weights_sha256"] = attrs.get("weights_sha256") or None
    if features.ndim != 2 or features.dtype != np.float32 or labels.shape != (len(features),) \
            or len(paths) != len(features):
        raise FeatureFileError(f"{path}: inconsistent datasets (features {features.shape} {features.dtype}, "
                               f"labels {labels.shape}, {len(paths)} paths); {RERUN}")

    for key, value in (expect or {}).items():
        if key not in EXPECT_KEYS:
            raise ValueError(f"unknown expect key {key!r}; use {', '.join(EXPECT_KEYS)}")
        want = _expected_value(key, value, attrs)
        if attrs[key] != want:
            raise FeatureFileError(
                f"{path}: made with {key}={attrs[key]!r} but the parameters ask for {key}={want!r}; {RERUN}"
            )
    return features, labels.astype(np.int64), paths, attrs
