"""Feature files: images of one split -> the base's activations, as an HDF5 file (docs/design.md).

Extraction streams batches through the feature model and keeps its progress in a work folder next
to the output (`features/.train.h5.work/`): a fingerprint of everything the features depend on,
and one `.npy` per finished chunk of rows, each written to a temp name and renamed. A killed run
resumes from its last finished chunk when rerun with the same fingerprint; a changed input or
parameter discards the folder. Once all chunks exist, the .h5 is assembled chunk by chunk under a
temp name, renamed, and the work folder removed. Chunks hold whole batches, so a resumed run feeds
the model exactly the batches a clean run would, and (with TF op determinism) gives the same bytes.

HDF5 bytes are deterministic: no timestamps (`track_times=False`), fixed dtypes and chunk shapes,
no compression, attributes written in a fixed order.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tlpipe import atomic
from tlpipe.data.manifests import manifest_rows
from tlpipe.errors import DataError, FeatureFileError

FORMAT = 1
CHUNK_TARGET_ROWS = 256  # rows per resumable chunk: ~17 s of VGG16 work at 150 px on 2 CPU cores
H5_CHUNK_BYTES = 1 << 20  # HDF5 storage chunk of `features`: about 1 MiB of whole rows
EXPECT_KEYS = ("backbone", "weights", "layer", "pooling", "image_size", "class_names")
RERUN = "rerun the extract stage (`dvc repro extract`)"


@dataclass(frozen=True)
class BaseSpec:
    """What the features are made of: the `backbone` section of params.yaml."""

    name: str = "vgg16"
    weights: str = "imagenet"
    layer: str | None = None
    pooling: str = "flatten"
    image_size: int = 150

    @classmethod
    def from_params(cls, backbone) -> "BaseSpec":
        return cls(backbone.name, backbone.weights, backbone.layer, backbone.pooling, backbone.image_size)


class Extractor:
    """A built feature model and the metadata stored with its features; build once, use per split.

    With backbone.layer or backbone.pooling `auto` (`probing`), the model gives every candidate layer's
    activations, flattened side by side (`raw` takes one layer's back out); the probe then picks one
    (layer, pooling) (features.splits). Otherwise it gives the features themselves."""

    def __init__(self, spec: BaseSpec, precision: str = "float32"):
        import keras

        from tlpipe.choices import AUTO, POOLINGS, probe_layers
        from tlpipe.features import backbones

        self.spec = spec
        self.precision = precision
        base = backbones.build_base(spec.name, spec.weights, spec.image_size, precision)
        layers = [backbones.resolve_layer(base, None if spec.layer == AUTO else spec.layer)]
        if spec.layer == AUTO and probe_layers(spec.name):
            layers = list(probe_layers(spec.name))
        poolings = list(POOLINGS) if spec.pooling == AUTO else [spec.pooling]
        self.candidates = [(layer, pooling) for layer in layers for pooling in poolings]
        self.probing = AUTO in (spec.layer, spec.pooling)
        if self.probing:
            self.layer = None
            self.shapes = {layer: tuple(int(d) for d in base.get_layer(layer).output.shape[1:]) for layer in layers}
            flat = [keras.layers.Flatten(dtype="float32", name=f"raw_{layer}")(base.get_layer(layer).output)
                    for layer in layers]
            out = flat[0] if len(flat) == 1 else keras.layers.Concatenate(dtype="float32", name="candidates")(flat)
            self.model = keras.Model(base.input, out, name=f"{base.name}_candidates")
        else:
            self.layer = layers[0]
            self.model = backbones.feature_model(base, self.layer, spec.pooling)
        self.dim = int(self.model.output_shape[-1])
        self.preprocessing = backbones.preprocessing_name(spec.name, spec.weights)
        self.weights_sha256 = backbones.weights_sha256(spec.name, spec.weights, spec.image_size)
        self._infer = None

    def raw(self, rows: np.ndarray, layer: str) -> np.ndarray:
        """`layer`'s (N, H, W, C) activations out of probing rows."""
        start = 0
        for name, shape in self.shapes.items():
            size = int(np.prod(shape))
            if name == layer:
                return rows[:, start:start + size].reshape(len(rows), *shape)
            start += size
        raise KeyError(layer)

    def pooled_dim(self, layer: str, pooling: str) -> int:
        shape = self.shapes[layer]
        return int(np.prod(shape)) if pooling == "flatten" else shape[-1]

    def attrs(self, class_names: Sequence[str], layer: str | None = None, pooling: str | None = None) -> dict:
        """The attributes of a feature file, in the order they are written (`layer`, `pooling`: the
        probe's choice when probing)."""
        return {
            "backbone": self.spec.name,
            "weights": self.spec.weights,
            "weights_sha256": self.weights_sha256 or "",
            "layer": layer or self.layer,
            "pooling": pooling or self.spec.pooling,
            "image_size": int(self.spec.image_size),
            "preprocessing": self.preprocessing,
            "class_names": json.dumps(list(class_names)),
            "tlpipe_format": FORMAT,
        }

    def __call__(self, batch) -> np.ndarray:
        import tensorflow as tf

        if self._infer is None:
            model = self.model
            self._infer = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        return self._infer(batch).numpy()


# ---------------------------------------------------------------- atomic writes


def _is_disk_full(exc: OSError) -> bool:
    return exc.errno == errno.ENOSPC or "No space left" in str(exc) or "errno = 28" in str(exc)


def save_chunk(path: Path, array: np.ndarray) -> None:
    """One finished chunk, atomically: a chunk file that exists is complete."""
    with atomic.target(path, fsync=True) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _chunk_path(work: Path, i: int) -> Path:
    return work / f"chunk_{i:06d}.npy"


def _valid_chunk(path: Path, rows: int, dim: int) -> bool:
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return a.shape == (rows, dim) and a.dtype == np.float32


def work_dir(out_h5) -> Path:
    out = Path(out_h5)
    return out.with_name(f".{out.name}.work")


# ---------------------------------------------------------------- extraction


def fingerprint(extractor: Extractor, files, labels, paths, class_names, batch_size: int, chunk_rows: int) -> str:
    """Hash of everything the feature bytes depend on; a different one discards saved progress."""
    import keras
    import tensorflow as tf

    def file_id(f):
        # Store files are content-addressed, so name and size identify them (mtime changes on checkout).
        return [os.path.basename(f), os.path.getsize(f)]

    data = {
        "format": FORMAT,
        "spec": asdict(extractor.spec),
        "layer": extractor.layer,
        "candidates": extractor.candidates if extractor.probing else None,
        "preprocessing": extractor.preprocessing,
        "weights_sha256": extractor.weights_sha256,
        "precision": extractor.precision,
        "batch_size": batch_size,
        "chunk_rows": chunk_rows,
        "class_names": list(class_names),
        "rows": [file_id(f) + [int(l), p] for f, l, p in zip(files, labels, paths)],
        "versions": [tf.__version__, keras.__version__],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def prepare_work(work: Path, fp: str) -> None:
    marker = work / "fingerprint"
    if work.exists() and (not marker.is_file() or marker.read_text() != fp):
        shutil.rmtree(work)  # stale progress of other inputs or parameters
    work.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        atomic.write_bytes(marker, fp.encode(), fsync=True)


def _done_chunks(work: Path, n_rows: int, chunk_rows: int, dim: int) -> int:
    """How many chunks, from the first, are complete; later chunk files are removed."""
    n_chunks = math.ceil(n_rows / chunk_rows)
    done = 0
    while done < n_chunks and _valid_chunk(_chunk_path(work, done), min(chunk_rows, n_rows - done * chunk_rows), dim):
        done += 1
    for stray in work.glob(".chunk_*.tmp"):  # temp file of a killed write
        stray.unlink()
    for stray in work.glob("chunk_*.npy*"):
        if stray.name.endswith(".tmp") or int(stray.name[6:12]) >= done:
            stray.unlink()
    return done


def default_chunk_rows(batch_size: int) -> int:
    return batch_size * max(1, round(CHUNK_TARGET_ROWS / batch_size))


@dataclass
class SplitWork:
    """One split's finished chunks in its work folder, ready to assemble."""

    out: Path
    work: Path
    labels: list
    paths: list
    chunk_rows: int

    @property
    def n(self) -> int:
        return len(self.labels)

    def chunks(self):
        """Each chunk's rows in order, memory-mapped."""
        for i in range(math.ceil(self.n / self.chunk_rows)):
            yield np.load(_chunk_path(self.work, i), mmap_mode="r", allow_pickle=False)

    def rows(self, index: np.ndarray) -> np.ndarray:
        """The rows at sorted `index`, one chunk mapped at a time."""
        parts = []
        for i, chunk in enumerate(self.chunks()):
            local = index[(index >= i * self.chunk_rows) & (index < (i + 1) * self.chunk_rows)] - i * self.chunk_rows
            if len(local):
                parts.append(np.asarray(chunk[local]))
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _write_errors(out: Path, work: Path):
    """OSError while extracting -> FeatureFileError saying what to do (finished chunks are kept)."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except OSError as exc:
            if _is_disk_full(exc):
                raise FeatureFileError(
                    f"{out}: disk full while writing features ({exc.strerror or exc}); free some space and "
                    f"{RERUN}: finished chunks in {work} are kept and reused"
                ) from None
            raise FeatureFileError(f"{out}: cannot write features ({exc}); fix the folder and {RERUN}") from None

    return guard()


def compute_split(manifest_csv, images_dir, out_h5, extractor: Extractor, classes: Sequence[str],
                  batch_size: int = 32, chunk_rows: int | None = None) -> SplitWork:
    """Run one split's images through `extractor` into chunk files (resumable; see the module docstring)."""
    import tensorflow as tf
    from tqdm import tqdm

    from tlpipe.features.inputs import image_dataset

    out = Path(out_h5)
    files, labels, paths = manifest_rows(manifest_csv, images_dir, classes)
    chunk_rows = chunk_rows or default_chunk_rows(batch_size)
    if chunk_rows % batch_size:
        raise ValueError(f"chunk_rows ({chunk_rows}) must be a multiple of batch_size ({batch_size})")

    # Same inputs -> same features, on every run and after a resume.
    tf.config.experimental.enable_op_determinism()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = work_dir(out)
    n, dim = len(files), extractor.dim
    with _write_errors(out, work):
        prepare_work(work, fingerprint(extractor, files, labels, paths, classes, batch_size, chunk_rows))
        done = _done_chunks(work, n, chunk_rows, dim)
        start = done * chunk_rows
        if start < n:
            ds = image_dataset(files[start:], extractor.spec.image_size, batch_size, extractor.preprocessing)
            chunk, buffered = done, []
            with tqdm(total=n, initial=start, unit="img", desc=f"extract {out.name}", file=sys.stderr,
                      dynamic_ncols=True) as bar:
                it = iter(ds)
                row = start
                while row < n:
                    try:
                        batch = next(it)
                    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as exc:
                        raise DataError(
                            f"cannot read an image among {files[row]} and the {batch_size - 1} after it "
                            f"({exc.message.splitlines()[0]}); rerun the data stage (`dvc repro data`)"
                        ) from None
                    buffered.append(extractor(batch))
                    row += len(buffered[-1])
                    bar.update(len(buffered[-1]))
                    if row - chunk * chunk_rows >= chunk_rows or row >= n:
                        save_chunk(_chunk_path(work, chunk), np.concatenate(buffered).astype(np.float32))
                        chunk, buffered = chunk + 1, []
    return SplitWork(out, work, list(labels), list(paths), chunk_rows)


def assemble_split(split: SplitWork, dim: int, attrs: dict, select=None) -> Path:
    """Write the split's .h5 from its chunks (`select`: rows -> stored features; None: as they are)."""
    with _write_errors(split.out, split.work):
        _check_room(split.out, _assembled_size(split.n, dim, split.paths))
        _assemble(split.out, split.work, split.n, dim, split.chunk_rows, split.labels, split.paths, attrs, select)
    return split.out


def extract_split(
    manifest_csv,
    images_dir,
    out_h5,
    spec: BaseSpec,
    classes: Sequence[str],
    batch_size: int = 32,
    precision: str = "float32",
    *,
    extractor: Extractor | None = None,
    chunk_rows: int | None = None,
    keep_work: bool = False,
) -> Path:
    """Extract the features of one split into `out_h5` (resumable; see the module docstring); for a
    spec that names its layer and pooling (`auto` needs every split: see `features.splits`).

    `extractor`: a prebuilt `Extractor(spec, precision)`, to build the model once for all splits.
    `chunk_rows`: rows per resumable chunk, a multiple of `batch_size` (default ~256).
    `keep_work`: leave the finished chunks for the caller to remove (see `features.splits`).
    """
    if extractor is None:
        extractor = Extractor(spec, precision)
    elif extractor.spec != spec or extractor.precision != precision:
        raise ValueError("extractor was built for another spec or precision")
    if extractor.probing:
        raise ValueError("backbone.layer/pooling auto choose on the validation split: use features.splits")
    split = compute_split(manifest_csv, images_dir, out_h5, extractor, classes, batch_size, chunk_rows)
    assemble_split(split, extractor.dim, extractor.attrs(classes))
    if not keep_work:
        shutil.rmtree(split.work, ignore_errors=True)
    return split.out


def _h5_chunk_rows(n: int, dim: int) -> int:
    return max(1, min(n, H5_CHUNK_BYTES // (4 * max(dim, 1))))


def _assembled_size(n: int, dim: int, paths) -> int:
    """Upper estimate of the final file's bytes: data, string heap, and room for HDF5's metadata."""
    return n * dim * 4 + n * 8 + sum(len(p.encode("utf-8")) + 32 for p in paths) + (1 << 20)


def _check_room(out: Path, size: int) -> None:
    """Refuse before writing: HDF5 reports a failed write only when the file closes, as a
    RuntimeError, and h5py may then crash while freeing it; so a full disk must not get that far."""
    import resource

    free = shutil.disk_usage(out.parent).free
    if free < size:
        raise OSError(errno.ENOSPC, f"No space left on device: {size >> 20} MiB needed, {free >> 20} MiB free")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < size:
        raise OSError(errno.EFBIG, f"File too large: {size} bytes needed, the file-size limit (ulimit -f) is {limit}")


def _assemble(out: Path, work: Path, n: int, dim: int, chunk_rows: int, labels, paths, attrs: dict,
              select=None) -> None:
    """Write the final .h5 from the chunk files, one chunk in memory at a time, under a temp name
    (`select`: chunk rows -> the features stored)."""
    import h5py

    try:
        with atomic.target(out) as tmp, h5py.File(tmp, "w", track_order=False) as f:
            chunks = (_h5_chunk_rows(n, dim), dim) if n else None
            feats = f.create_dataset("features", shape=(n, dim), dtype="float32", chunks=chunks,
                                     track_times=False)
            for i in range(math.ceil(n / chunk_rows)):
                rows = np.load(_chunk_path(work, i), mmap_mode="r", allow_pickle=False)
                feats[i * chunk_rows:(i + 1) * chunk_rows] = rows if select is None else select(rows)
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64).reshape(n), track_times=False)
            f.create_dataset("paths", data=np.asarray(paths, dtype=object).reshape(n),
                             dtype=h5py.string_dtype("utf-8"), track_times=False)
            for key, value in attrs.items():
                f.attrs[key] = value
    except RuntimeError as exc:
        # h5py reports a failed write (disk filled up meanwhile) as RuntimeError on close.
        raise OSError(errno.EIO, f"HDF5 could not write the file: {exc}") from None


# ---------------------------------------------------------------- reading


def _expected_value(key: str, value, attrs: dict):
    if key == "layer" and value is None:
        from tlpipe.features.backbones import default_layer

        return default_layer(attrs.get("backbone", ""))
    if key == "class_names":
        return list(value)
    if key == "image_size":
        return int(value)
    return value


def plain_attrs(attrs) -> dict:
    """HDF5 attributes as plain Python (str, int, float), so they compare and serialise simply."""
    def plain(v):
        return v.decode() if isinstance(v, bytes) else v.item() if isinstance(v, np.generic) else v

    return {k: plain(v) for k, v in attrs.items()}


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
            attrs = plain_attrs(f.attrs)
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
