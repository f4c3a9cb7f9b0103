"""The augmented-activation cache: the frozen part of the base, run once over augmented views.

The book trains `conv_base + head` on freshly augmented images every epoch, running the whole
frozen base each time. The frozen part never changes, so we split the base at the freeze boundary
(the layer just before `finetune.unfreeze_from`: block4_pool for VGG16's block5_conv1, which `auto`
picks when backbone.layer is block5_pool; block3_pool for block4_conv1, auto's pick at block4_pool), run the
frozen PREFIX once over `views` augmented copies of each training image and over the plain
validation and test images, and store its activations (float16) in one HDF5 file. Training then runs
only the SUFFIX (block5 here) + pooling + head, each epoch on a different stored view of each image.

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

Building runs one job per shard (`rows_per_shard` images of one part) on the engine of
`compute.engine` (features/engine.py): locally, or on a Ray actor pool. Finished shards are kept in
`.<out>.work/` (a fingerprint + one file per shard, written atomically) until every shard exists;
then they move into the shard folder and the table file is written under a temp name and renamed;
a changed input or setting discards the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


import numpy as np

from tlpipe import atomic
from tlpipe.choices import AUGMENT_MODES
from tlpipe.data.manifests import SPLITS, manifest_rows, read_class_names
from tlpipe.features.augment import augment_images, augment_settings, image_seeds
from tlpipe.errors import ConfigError, DataError, FeatureFileError

FORMAT = 1
KIND = "views"
RERUN = "rerun the viewcache stage (dvc repro viewcache)"


# ---------------------------------------------------------------- splitting the base

def layer_order(base) -> list[str]:
    """The base's layer names in order, input layer first."""
    return [layer.name for layer in base.layers]


def boundary_layer(base, unfreeze_from: str) -> str:
    """The last frozen layer: the one just before `unfreeze_from` (ConfigError lists valid names)."""
    names = layer_order(base)
    if unfreeze_from not in names[1:]:
        raise ConfigError(f"finetune.unfreeze_from: {base.name} has no layer {unfreeze_from!r}; choose one "
                          f"of: {', '.join(names[1:])}")
    return names[names.index(unfreeze_from) - 1]


def resolve_unfreeze(name: str, base, layer: str | None, unfreeze_from: str) -> str:
    """finetune.unfreeze_from (`auto` or a name) as a layer of `base` (architecture `name`) cut at `layer`:
    auto is the first layer of the last block kept (choices.unfreeze_layer); ConfigError names the keys."""
    from tlpipe.choices import unfreeze_layer

    names = layer_order(base)[1:]
    if layer is not None and layer not in names:
        from tlpipe.features.backbones import resolve_layer

        resolve_layer(base, layer)  # its ConfigError lists the valid names
    try:
        return unfreeze_layer(name, layer, unfreeze_from, names) or unfreeze_from
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def prefix_model(base, boundary: str):
    """Preprocessed images -> activations of `boundary` (the frozen part), sharing the base's layers."""
    import keras

    return keras.Model(base.input, base.get_layer(boundary).output, name="prefix")


# ---------------------------------------------------------------- cache identity

@dataclass(frozen=True)
class CacheSpec:
    """Everything the cache's contents depend on (stored as the file's attrs)."""
    mode: str
    backbone: str
    weights: str
    weights_sha256: str | None
    image_size: int
    preprocessing: str
    precision: str
    boundary: str
    unfreeze_from: str
    views: int
    augment: dict
    class_names: tuple

    @classmethod
    def from_params(cls, backbone, augment, compute, unfreeze_from: str, class_names, base) -> "CacheSpec":
        """From the params sections (backbone, augment, compute) and finetune.unfreeze_from (`auto`:
        resolved against backbone.layer, so the boundary moves with the cut)."""
        from tlpipe.features import backbones

        unfreeze_from = resolve_unfreeze(backbone.name, base, backbone.layer, unfreeze_from)
        if augment.mode == "cached" and unfreeze_from == layer_order(base)[1]:
            raise ConfigError(f"finetune.unfreeze_from: {unfreeze_from!r} is the base's first layer, which leaves "
                              f"the view cache (augment.mode: cached) nothing frozen to store; choose a later "
                              f"layer, or augment.mode: online")
        return cls(mode=augment.mode, backbone=backbone.name, weights=backbone.weights,
                   weights_sha256=backbones.weights_sha256(backbone.name, backbone.weights, backbone.image_size),
                   image_size=backbone.image_size,
                   preprocessing=backbones.preprocessing_name(backbone.name, backbone.weights),
                   precision=compute.precision, boundary=boundary_layer(base, unfreeze_from),
                   unfreeze_from=unfreeze_from, views=int(augment.views), augment=augment_settings(augment),
                   class_names=tuple(class_names))

    def attrs(self) -> dict:
        return {
            "tlpipe_format": FORMAT, "kind": KIND, "mode": self.mode, "backbone": self.backbone,
            "weights": self.weights, "weights_sha256": self.weights_sha256 or "",
            "image_size": int(self.image_size), "preprocessing": self.preprocessing,
            "precision": self.precision, "boundary": self.boundary, "unfreeze_from": self.unfreeze_from,
            "views": int(self.views), "augment": json.dumps(self.augment, sort_keys=True),
            "class_names": json.dumps(list(self.class_names)),
        }

    def fingerprint(self, parts: dict, batch_size: int, activation_dtype, rows_per_shard: int = 0) -> str:
        """Hash of everything the cache bytes depend on; a different one discards saved progress."""
        import keras
        import tensorflow as tf

        from tlpipe.threads import INTRA_OP_THREADS

        # Store files are content-addressed, so name and size identify them (mtime changes on checkout).
        rows = {p: [[os.path.basename(f), os.path.getsize(f), int(l), str(q)] for f, l, q in zip(*parts[p])]
                for p in sorted(parts)}
        blob = json.dumps({"attrs": self.attrs(), "rows": rows, "batch_size": int(batch_size),
                           "dtype": np.dtype(activation_dtype).name, "rows_per_shard": int(rows_per_shard),
                           "versions": [tf.__version__, keras.__version__],
                           "intra_op_threads": INTRA_OP_THREADS}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------- building

CACHE_TARGET_ROWS = 64  # images per shard: a training image costs `views` passes, so fewer than extract's


def default_rows_per_shard(batch_size: int) -> int:
    """A multiple of the batch size, so a shard's batches are the batches a whole run would make."""
    return batch_size * max(1, round(CACHE_TARGET_ROWS / batch_size))


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(n, start + batch_size)


def shard_prefix(part: str) -> str:
    return f"{part}-"


def _write_h5(out: Path, spec: CacheSpec, parts: dict, tables: dict, manifest_sha256: str | None,
              activation_dtype) -> None:
    """The table file: per part a virtual `activations` over its shards (`tables[part]`: shape and
    (start, rows, file) of each shard), labels and paths; under a temp name, then renamed."""
    import h5py

    from tlpipe.features import shards

    folder = shards.shards_dir(out).name
    with atomic.target(out) as tmp:
        with h5py.File(tmp, "w", libver=("earliest", "v110")) as f:
            for k, v in spec.attrs().items():
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


def build_cache(out_path, parts: dict, *, base, spec: CacheSpec, batch_size: int = 32,
                activation_dtype="float16", progress: bool = True, engine=None,
                rows_per_shard: int | None = None) -> Path:
    """Write the cache for `parts` = {"train"|"validation"|"test": (files, labels, paths)}.

    `base` is the built backbone (its weights as named in `spec`; the local engine uses it, Ray's
    actors build their own); `spec.mode == "online"` writes the marker file only. `activation_dtype`
    is float16 in the pipeline (float32 for exactness tests). `engine`: a features.engine.Engine
    (None: this process). `rows_per_shard`: images per shard, a multiple of `batch_size`."""
    from tlpipe.features import shards
    from tlpipe.features.shards import work_dir

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if spec.mode not in AUGMENT_MODES:
        raise ConfigError(f"augment.mode: must be one of {', '.join(AUGMENT_MODES)}, got {spec.mode!r}")
    if spec.mode == "online":
        shards.publish(out, work_dir(out), [], "online")  # the (empty) shard folder dvc.yaml lists
        _write_h5(out, spec, parts, {}, None, activation_dtype)
        return out
    if int(spec.views) < 1:
        raise ConfigError(f"augment.views: must be >= 1, got {spec.views}")
    rows = rows_per_shard or default_rows_per_shard(batch_size)
    if rows % batch_size:
        raise ValueError(f"rows_per_shard ({rows}) must be a multiple of batch_size ({batch_size})")
    work = work_dir(out).absolute()  # workers elsewhere (Ray) do not share this process's cwd
    fp = spec.fingerprint(parts, batch_size, activation_dtype, rows)
    reuse = shards.reusable(out, fp)
    act_shape = tuple(int(d) for d in prefix_model(base, spec.boundary).output_shape[1:])
    dtype = np.dtype(activation_dtype).name
    jobs, tables = [], {}
    for part in (p for p in SPLITS if p in parts):
        files = [os.path.abspath(f) for f in parts[part][0]]
        lead = (spec.views,) if part == "train" else ()
        pieces = []
        for i, (start, stop) in enumerate(shards.ranges(len(files), rows)):
            name = shards.shard_name(i, shard_prefix(part))
            pieces.append((start, stop - start, name))
            jobs.append({"shard": name, "part": part, "start": start, "files": files[start:stop],
                         "target": str(work / name), "shape": [stop - start, *lead, *act_shape], "dtype": dtype,
                         "reuse": [str(shards.shards_dir(out).absolute() / name), reuse[name]] if name in reuse else None,
                         "images": (stop - start) * (spec.views if part == "train" else 1)})
        tables[part] = ((len(files), *lead, *act_shape), pieces)

    try:
        shards.prepare_work(work, fp)
        results = _run(engine, jobs, CacheWork(spec, batch_size, dtype, base), progress, out.name)
        entries = [{"file": j["shard"], "start": j["start"], "rows": len(j["files"]),
                    "sha256": results[j["shard"]]["sha256"], "bytes": results[j["shard"]]["bytes"]} for j in jobs]
        manifest_sha = shards.publish(out, work, entries, fp)
        _write_h5(out, spec, parts, tables, manifest_sha, activation_dtype)
    except OSError as exc:
        raise FeatureFileError(f"{out}: cannot write the view cache ({exc}); fix the folder or free space and "
                               f"rerun the viewcache stage: finished shards in {work} are kept") from None
    shutil.rmtree(work, ignore_errors=True)
    return out


def _run(engine, jobs, make_worker, progress: bool, name: str) -> dict:
    from tqdm import tqdm

    from tlpipe.features import shards

    # Counted in images through the prefix, not shards: a training image costs `views` passes.
    with tqdm(total=sum(j["images"] for j in jobs), desc=f"view cache -> {name}", unit="img",
              disable=not progress, file=sys.stderr) as bar:
        sizes = {j["shard"]: j["images"] for j in jobs}
        run = engine.run if engine is not None else shards.run_local
        return run(jobs, make_worker, progress=lambda r: bar.update(sizes[r["shard"]]))


class CacheWork:
    """What a worker needs to compute view-cache shards; called once per worker to build it.

    Pickled to Ray's actors without the built base: each actor builds its own from the spec."""

    def __init__(self, spec: CacheSpec, batch_size: int, dtype: str, base=None):
        self.spec, self.batch_size, self.dtype, self.base = spec, batch_size, dtype, base

    def __getstate__(self):
        return {**self.__dict__, "base": None}

    def __call__(self):
        return CacheWorker(self)


class CacheWorker:
    """Holds the frozen prefix once; turns a shard job into its shard file (see shards.ensure_shard)."""

    def __init__(self, work: CacheWork):
        import tensorflow as tf

        from tlpipe.features.backbones import build_base

        spec = self.spec = work.spec
        base = work.base if work.base is not None else build_base(spec.backbone, spec.weights, spec.image_size,
                                                                  spec.precision)
        self.prefix = prefix_model(base, spec.boundary)
        self.settings = augment_settings(spec.augment)
        self.batch_size, self.dtype = work.batch_size, work.dtype
        tf.config.experimental.enable_op_determinism()  # same inputs -> same bytes, also after a resume

    def __call__(self, job: dict) -> dict:
        from tlpipe.features import shards

        return shards.ensure_shard(job, lambda timings: self.compute(job, timings))

    def compute(self, job: dict, timings: dict) -> np.ndarray:
        import time

        import tensorflow as tf

        from tlpipe.features.shards import unreadable
        from tlpipe.features.inputs import read_resized

        spec, files = self.spec, job["files"]
        problem = unreadable(files)
        if problem:
            raise DataError(problem)
        timings.update(decode_s=0.0, forward_s=0.0)
        out = []
        for start, stop in _batches(len(files), self.batch_size):
            t = time.perf_counter()
            try:
                images = tf.stack([read_resized(tf.constant(f), spec.image_size) for f in files[start:stop]])
            except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as exc:
                raise DataError(f"cannot read an image among {files[start]} and the {stop - start - 1} after it "
                                f"({exc.message.splitlines()[0]}); rerun the data stage (`dvc repro data`)") from None
            t2 = time.perf_counter()
            if job["part"] == "train":
                idx = np.arange(job["start"] + start, job["start"] + stop)
                acts = np.stack([self._prefix(augment_images(images, image_seeds(self.settings["seed"], v, idx),
                                                             self.settings)) for v in range(spec.views)], axis=1)
            else:  # validation and test images are never augmented
                acts = self._prefix(images)
            timings["decode_s"] += t2 - t
            timings["forward_s"] += time.perf_counter() - t2
            out.append(acts)
        return np.concatenate(out)

    def _prefix(self, images):
        import tensorflow as tf

        from tlpipe.features.backbones import preprocess

        x = self.prefix(preprocess(images, self.spec.preprocessing), training=False)
        return np.asarray(tf.cast(x, tf.float32)).astype(self.dtype)


# ---------------------------------------------------------------- reading

def read_attrs(path) -> dict:
    """The cache's attrs (decoded); FeatureFileError when missing or not a view cache."""
    import h5py

    from tlpipe.features.shards import plain_attrs

    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"{path}: view cache not found; run the viewcache stage (dvc repro viewcache)")
    try:
        with h5py.File(path, "r") as f:
            attrs = plain_attrs(f.attrs)
    except OSError as e:
        raise FeatureFileError(f"{path}: not a readable HDF5 view cache ({e}); delete it and rerun "
                               f"the viewcache stage") from None
    if attrs.get("kind") != KIND or int(attrs.get("tlpipe_format", -1)) != FORMAT:
        raise FeatureFileError(f"{path}: not a tlpipe view cache of format {FORMAT}; rerun the viewcache stage")
    if "shards_sha256" in attrs:  # the activations live in the shard folder beside the file
        from tlpipe.features import shards

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


def epoch_views(n: int, views: int, seed: int, epoch: int) -> np.ndarray:
    """The view each image shows in `epoch`, seeded by (seed, epoch) alone, so resuming repeats it.

    Each image walks through a random permutation of its views, a fresh one every `views` epochs:
    no view repeats before all have been shown, so with `views >= epochs` every epoch sees new
    augmentations, as online training does. (training.fit shuffles the order itself.)"""
    cycle, position = divmod(int(epoch), int(views))
    keys = np.random.default_rng([int(seed), cycle, 1]).random((n, views))
    return np.argsort(keys, axis=1, kind="stable")[:, position]


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

    def epoch(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(activations [N, h, w, c] float32, labels) of `epoch`: one view of each image, in file order."""
        view = epoch_views(self.n, self.views, seed, epoch)
        out = np.empty((self.n,) + self.activation_shape, self._acts.dtype)
        for i in range(self.n):
            self._acts.read_direct(out, np.s_[i, view[i]], np.s_[i])
        return out.astype(np.float32), self.labels.copy()

    def map_views(self, fn, batch_size: int = 64) -> np.ndarray:
        """fn applied to every stored view: [N, views, ...] (float32), reading a few images at a time."""
        out = None
        for start, stop in _batches(self.n, batch_size):
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


def build_from_manifests(split_dir, images_dir, out, *, backbone, augment, compute, unfreeze_from: str,
                         progress: bool = True, engine=None) -> Path:
    """The viewcache stage: the split manifests -> `out` (params sections as plain arguments;
    `engine`: features.engine.Engine of compute.engine, None: this process)."""
    from tlpipe.features.backbones import build_base

    split_dir = Path(split_dir)
    classes = read_class_names(split_dir / "classes.json")
    parts = {p: manifest_rows(split_dir / f"{p}.csv", images_dir, classes) for p in SPLITS}
    base = build_base(backbone.name, backbone.weights, backbone.image_size, compute.precision)
    spec = CacheSpec.from_params(backbone, augment, compute, unfreeze_from, classes, base)
    return build_cache(out, parts, base=base, spec=spec, batch_size=compute.batch_size, progress=progress,
                       engine=engine)
