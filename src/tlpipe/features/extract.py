"""Feature files: images of one split -> the base's activations, as an HDF5 table (docs/design.md).

Extraction cuts the split into shards of fixed rows (`chunk_rows`, a multiple of the batch size)
and runs one job per shard on the engine of `compute.engine` (features/engine.py: this process,
or a Ray actor pool); each worker writes its shard whole into a work folder next to the output
(`features/.train.h5.work/`, with a fingerprint of everything the features depend on), under a
temp name then renamed. A killed run resumes from the shards it finished when rerun with the same
fingerprint; a changed input or parameter discards the folder. Once all shards exist, they move
into `features/train.shards/` with a manifest of their hashes, and `features/train.h5` is written
under a temp name and renamed: labels, paths, attributes, and `features` as a virtual dataset over
the shards (features/shards.py). A shard holds whole batches from its first row, so any worker
feeds the model exactly the batches a one-process run would, and (with TF op determinism) the
bytes are the same whatever the engine and the number of workers.

HDF5 bytes are deterministic: no timestamps (`track_times=False`), fixed dtypes, no compression,
attributes written in a fixed order.

With backbone.layer or pooling `auto` the shards hold every candidate layer's activations
(features.all_splits runs the probe on them); the published shards are then the chosen candidate's,
one derived file per shard.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tlpipe.data.manifests import manifest_rows
from tlpipe.runtime.errors import FeatureFileError
from tlpipe.features import featurefile, shards
from tlpipe.features.featurefile import RERUN
from tlpipe.hashes import file_sha256

CHUNK_TARGET_ROWS = 256  # rows per shard: ~17 s of VGG16 work at 150 px on 2 CPU cores


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
    (layer, pooling) (features.all_splits). Otherwise it gives the features themselves."""

    def __init__(self, spec: BaseSpec, precision: str = "float32"):
        import keras

        from tlpipe.config.choices import AUTO, POOLINGS, probe_layers
        from tlpipe.features import backbones, pretrained

        self.spec = spec
        self.precision = precision
        base = pretrained.build_base(spec.name, spec.weights, spec.image_size, precision)
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
        self.weights_sha256 = pretrained.weights_sha256(spec.name, spec.weights, spec.image_size)
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
        from tlpipe.features.backbones import pooled_width

        return pooled_width(self.shapes[layer], pooling)

    def attrs(self, class_names: Sequence[str], layer: str | None = None, pooling: str | None = None) -> dict:
        """The attributes of a feature file, in the order they are written (`layer`, `pooling`: the
        probe's choice when probing)."""
        return featurefile.file_attrs(
            backbone=self.spec.name, weights=self.spec.weights, weights_sha256=self.weights_sha256,
            layer=layer or self.layer, pooling=pooling or self.spec.pooling, image_size=self.spec.image_size,
            preprocessing=self.preprocessing, class_names=class_names)

    def __call__(self, batch) -> np.ndarray:
        import tensorflow as tf

        if self._infer is None:
            model = self.model
            self._infer = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        return self._infer(batch).numpy()


# ---------------------------------------------------------------- work folder


def _is_disk_full(exc: OSError) -> bool:
    return exc.errno == errno.ENOSPC or "No space left" in str(exc) or "errno = 28" in str(exc)


# ---------------------------------------------------------------- extraction


def fingerprint(extractor: Extractor, files, labels, paths, class_names, batch_size: int, chunk_rows: int) -> str:
    """Hash of everything the feature bytes depend on; a different one discards saved progress."""
    return shards.fingerprint({
        "format": featurefile.FORMAT,
        "spec": asdict(extractor.spec),
        "layer": extractor.layer,
        "candidates": extractor.candidates if extractor.probing else None,
        "preprocessing": extractor.preprocessing,
        "weights_sha256": extractor.weights_sha256,
        "precision": extractor.precision,
        "batch_size": batch_size,
        "chunk_rows": chunk_rows,
        "class_names": list(class_names),
        "rows": shards.file_rows(files, labels, paths),
    })


class ExtractWorkerFactory:
    """What a worker needs to compute feature shards; called once per worker to build it. Pickled
    to Ray's actors without the built extractor: each actor builds its own from the spec."""

    def __init__(self, spec: BaseSpec, precision: str, batch_size: int, extractor: Extractor | None = None):
        self.spec, self.precision, self.batch_size, self.extractor = spec, precision, batch_size, extractor

    def __getstate__(self):
        return {**self.__dict__, "extractor": None}

    def __call__(self):
        return ExtractWorker(self)


class ExtractWorker:
    """Holds the feature model once; turns a shard job into its shard file (shards.ensure_shard)."""

    def __init__(self, factory: ExtractWorkerFactory):
        import tensorflow as tf

        self.extractor = factory.extractor or Extractor(factory.spec, factory.precision)
        self.batch_size = factory.batch_size
        tf.config.experimental.enable_op_determinism()  # same inputs -> same features, on every worker

    def __call__(self, job: dict) -> dict:
        return shards.ensure_shard(job, lambda timings: self.compute(job, timings))

    def compute(self, job: dict, timings: dict) -> np.ndarray:
        """The shard's rows: its images in batches from its first row, as a whole run batches them."""
        from tlpipe.features.inputs import image_dataset

        files, ex = job["files"], self.extractor
        # tf.data decodes ahead (prefetch): the decode time is what the model waited.
        batches = image_dataset(files, ex.spec.image_size, self.batch_size, ex.preprocessing)
        return shards.compute_batches(files, self.batch_size, batches, lambda start, stop, batch: ex(batch),
                                      timings).astype(np.float32)


@dataclass
class ComputedSplit:
    """One split's finished shards in its work folder, ready to assemble."""

    out: Path
    work: Path
    labels: list
    paths: list
    chunk_rows: int
    entries: list  # per shard: file, start, rows, sha256, bytes (in row order)
    fingerprint: str

    @property
    def n(self) -> int:
        return len(self.labels)

    def chunks(self):
        """Each shard's rows in order, one shard in memory at a time."""
        import h5py

        for e in self.entries:
            with h5py.File(self.work / e["file"], "r") as f:
                yield f[shards.DATA][()]

    def rows(self, index: np.ndarray) -> np.ndarray:
        """The rows at sorted `index`, one shard read at a time."""
        parts = []
        for i, chunk in enumerate(self.chunks()):
            local = index[(index >= i * self.chunk_rows) & (index < (i + 1) * self.chunk_rows)] - i * self.chunk_rows
            if len(local):
                parts.append(np.asarray(chunk[local]))
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


@contextlib.contextmanager
def _write_errors(out: Path, work: Path):
    """OSError while extracting -> FeatureFileError saying what to do (finished shards are kept)."""
    try:
        yield
    except OSError as exc:
        if _is_disk_full(exc):
            raise FeatureFileError(
                f"{out}: disk full while writing features ({exc.strerror or exc}); free some space and "
                f"{RERUN}: finished shards in {work} are kept and reused"
            ) from None
        raise FeatureFileError(f"{out}: cannot write features ({exc}); fix the folder and {RERUN}") from None


def compute_split(manifest_csv, images_dir, out_h5, extractor: Extractor, classes: Sequence[str],
                  batch_size: int = 32, chunk_rows: int | None = None, engine=None) -> ComputedSplit:
    """Run one split's images through `extractor` into shard files in its work folder (resumable; see
    the module docstring), on `engine` (a features.engine.Engine; None: this process)."""
    from tlpipe.runtime.log import progress

    out = Path(out_h5)
    files, labels, paths = manifest_rows(manifest_csv, images_dir, classes)
    chunk_rows = shards.rows_per_shard(batch_size, chunk_rows, CHUNK_TARGET_ROWS)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = shards.work_dir(out).absolute()  # workers elsewhere (Ray) do not share this process's cwd
    n, dim = len(files), extractor.dim
    with _write_errors(out, work):
        fp = fingerprint(extractor, files, labels, paths, classes, batch_size, chunk_rows)
        shards.prepare_work(work, fp)
        reuse = shards.reusable(out, fp)
        final = shards.shards_dir(out).absolute()
        jobs = []
        for i, (s, e) in enumerate(shards.ranges(n, chunk_rows)):
            name = shards.shard_name(i)
            jobs.append({"shard": name, "start": s, "files": [os.path.abspath(f) for f in files[s:e]],
                         "target": str(work / name), "shape": [e - s, dim], "dtype": "float32",
                         "reuse": [str(final / name), reuse[name]] if name in reuse else None})
        sizes = {j["shard"]: len(j["files"]) for j in jobs}
        done = all(Path(j["target"]).exists() for j in jobs)  # nothing to compute: no bar
        run = engine.run if engine is not None else shards.run_local
        with progress(total=n, unit="img", desc=f"extract {out.name}", dynamic_ncols=True,
                      disable=done) as bar:
            results = run(jobs, ExtractWorkerFactory(extractor.spec, extractor.precision, batch_size, extractor),
                          progress=lambda r: bar.update(sizes[r["shard"]]))
    entries = [{"file": j["shard"], "start": j["start"], "rows": len(j["files"]),
                "sha256": results[j["shard"]]["sha256"], "bytes": results[j["shard"]]["bytes"]} for j in jobs]
    return ComputedSplit(out, work, list(labels), list(paths), chunk_rows, entries, fp)


def assemble_split(split: ComputedSplit, dim: int, attrs: dict, select=None) -> Path:
    """Publish the split's shards and write its .h5 over them (`select`: rows -> stored features,
    each shard then derived into a new one; None: the shards as they are, linked, so the work
    folder stays whole until the caller removes it)."""
    with _write_errors(split.out, split.work):
        entries, source, fp = split.entries, split.work, split.fingerprint
        if select is not None:
            source = split.work / "selected"
            shutil.rmtree(source, ignore_errors=True)
            entries = []
            for e, rows in zip(split.entries, split.chunks()):
                shards.write_shard(source / e["file"], np.ascontiguousarray(select(rows), np.float32))
                entries.append({**e, "sha256": file_sha256(source / e["file"]),
                                "bytes": (source / e["file"]).stat().st_size})
            # Not the raw shards' fingerprint: a later run must not take these for raw candidates.
            fp = hashlib.sha256(f"{fp} {attrs['layer']} {attrs['pooling']}".encode()).hexdigest()
        manifest_sha = shards.publish(split.out, source, entries, fp, keep=select is None)
        featurefile.write_table(split.out, split.n, dim, entries, split.labels, split.paths,
                                {**attrs, "shards_sha256": manifest_sha})
    return split.out
