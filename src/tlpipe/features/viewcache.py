"""The augmented-activation cache: the frozen part of the base, run once over augmented views.

The book trains `conv_base + head` on freshly augmented images every epoch, running the whole
frozen base each time. The frozen part never changes, so we split the base at the freeze boundary
(the layer just before `finetune.unfreeze_from`: block4_pool for VGG16's block5_conv1, which `auto`
picks when backbone.layer is block5_pool; block3_pool for block4_conv1, auto's pick at block4_pool), run the
frozen PREFIX once over `views` augmented copies of each training image and over the plain
validation and test images, and store its activations (float16) in one HDF5 file. Training then runs
only the SUFFIX (block5 here) + pooling + head, each epoch on a different stored view of each image.

The file's layout: features/viewfile.py.

Building runs one job per shard (`rows_per_shard` images of one part) on the engine of
`compute.engine` (features/engine.py): locally, or on a Ray actor pool. Finished shards are kept in
`.<out>.work/` (a fingerprint + one file per shard, written atomically) until every shard exists;
then they move into the shard folder and the table file is written under a temp name and renamed;
a changed input or setting discards the folder.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


import numpy as np

from tlpipe.data.manifests import SPLITS, manifest_rows, read_class_names
from tlpipe.runtime.errors import ConfigError, FeatureFileError
from tlpipe.features import shards, viewfile
from tlpipe.features.augment import augment_images, augment_settings, image_seeds
from tlpipe.features.boundary import boundary_layer, layer_order, prefix_model, resolve_unfreeze


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
        from tlpipe.features import backbones, pretrained

        unfreeze_from = resolve_unfreeze(backbone.name, base, backbone.layer, unfreeze_from)
        # config refuses this for the architectures it knows by name; the others are known only now.
        if augment.mode == "cached" and unfreeze_from == layer_order(base)[1]:
            raise ConfigError(f"finetune.unfreeze_from: {unfreeze_from!r} is the base's first layer, which leaves "
                              f"the view cache (augment.mode: cached) nothing frozen to store; choose a later "
                              f"layer, or augment.mode: online")
        return cls(mode=augment.mode, backbone=backbone.name, weights=backbone.weights,
                   weights_sha256=pretrained.weights_sha256(backbone.name, backbone.weights, backbone.image_size),
                   image_size=backbone.image_size,
                   preprocessing=backbones.preprocessing_name(backbone.name, backbone.weights),
                   precision=compute.precision, boundary=boundary_layer(base, unfreeze_from),
                   unfreeze_from=unfreeze_from, views=int(augment.views), augment=augment_settings(augment),
                   class_names=tuple(class_names))

    def attrs(self) -> dict:
        return {
            "tlpipe_format": viewfile.FORMAT, "kind": viewfile.KIND, "mode": self.mode, "backbone": self.backbone,
            "weights": self.weights, "weights_sha256": self.weights_sha256 or "",
            "image_size": int(self.image_size), "preprocessing": self.preprocessing,
            "precision": self.precision, "boundary": self.boundary, "unfreeze_from": self.unfreeze_from,
            "views": int(self.views), "augment": json.dumps(self.augment, sort_keys=True),
            "class_names": json.dumps(list(self.class_names)),
        }

    def fingerprint(self, parts: dict, batch_size: int, activation_dtype, rows_per_shard: int = 0) -> str:
        """Hash of everything the cache bytes depend on; a different one discards saved progress."""
        return shards.fingerprint({"attrs": self.attrs(),
                                   "rows": {p: shards.file_rows(*parts[p]) for p in sorted(parts)},
                                   "batch_size": int(batch_size), "dtype": np.dtype(activation_dtype).name,
                                   "rows_per_shard": int(rows_per_shard)})


# ---------------------------------------------------------------- building

CACHE_TARGET_ROWS = 64  # images per shard: a training image costs `views` passes, so fewer than extract's


def shard_prefix(part: str) -> str:
    return f"{part}-"


def build_cache(out_path, parts: dict, *, base, spec: CacheSpec, batch_size: int = 32,
                activation_dtype="float16", progress: bool = True, engine=None,
                rows_per_shard: int | None = None) -> Path:
    """Write the cache for `parts` = {"train"|"validation"|"test": (files, labels, paths)}.

    `base` is the built backbone (its weights as named in `spec`; the local engine uses it, Ray's
    actors build their own); `spec.mode == "online"` writes the marker file only. `activation_dtype`
    is float16 in the pipeline (float32 for exactness tests). `engine`: a features.engine.Engine
    (None: this process). `rows_per_shard`: images per shard, a multiple of `batch_size`."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if spec.mode == "online":
        shards.publish(out, shards.work_dir(out), [], "online")  # the (empty) shard folder dvc.yaml lists
        viewfile.write_table(out, spec.attrs(), parts, {}, None, activation_dtype)
        return out
    rows = shards.rows_per_shard(batch_size, rows_per_shard, CACHE_TARGET_ROWS)
    work = shards.work_dir(out).absolute()  # workers elsewhere (Ray) do not share this process's cwd
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
        results = _run(engine, jobs, CacheWorkerFactory(spec, batch_size, dtype, base), progress, out.name)
        entries = [{"file": j["shard"], "start": j["start"], "rows": len(j["files"]),
                    "sha256": results[j["shard"]]["sha256"], "bytes": results[j["shard"]]["bytes"]} for j in jobs]
        manifest_sha = shards.publish(out, work, entries, fp)
        viewfile.write_table(out, spec.attrs(), parts, tables, manifest_sha, activation_dtype)
    except OSError as exc:
        raise FeatureFileError(f"{out}: cannot write the view cache ({exc}); fix the folder or free space and "
                               f"rerun the viewcache stage: finished shards in {work} are kept") from None
    shutil.rmtree(work, ignore_errors=True)
    return out


def _run(engine, jobs, make_worker, progress: bool, name: str) -> dict:
    from tlpipe.runtime.log import progress as progress_bar

    # Counted in images through the prefix, not shards: a training image costs `views` passes.
    with progress_bar(total=sum(j["images"] for j in jobs), desc=f"view cache -> {name}", unit="img",
                      disable=not progress) as bar:
        sizes = {j["shard"]: j["images"] for j in jobs}
        run = engine.run if engine is not None else shards.run_local
        return run(jobs, make_worker, progress=lambda r: bar.update(sizes[r["shard"]]))


class CacheWorkerFactory:
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

    def __init__(self, factory: CacheWorkerFactory):
        import tensorflow as tf

        from tlpipe.features.pretrained import build_base

        spec = self.spec = factory.spec
        base = factory.base
        if base is None:
            base = build_base(spec.backbone, spec.weights, spec.image_size, spec.precision)
        self.prefix = prefix_model(base, spec.boundary)
        self.settings = augment_settings(spec.augment)
        self.batch_size, self.dtype = factory.batch_size, factory.dtype
        tf.config.experimental.enable_op_determinism()  # same inputs -> same bytes, also after a resume

    def __call__(self, job: dict) -> dict:
        return shards.ensure_shard(job, lambda timings: self.compute(job, timings))

    def compute(self, job: dict, timings: dict) -> np.ndarray:
        import tensorflow as tf

        from tlpipe.features.inputs import read_resized

        spec, files = self.spec, job["files"]
        batches = (tf.stack([read_resized(tf.constant(f), spec.image_size) for f in files[start:stop]])
                   for start, stop in shards.ranges(len(files), self.batch_size))

        def forward(start, stop, images):
            if job["part"] != "train":  # validation and test images are never augmented
                return self._prefix(images)
            idx = np.arange(job["start"] + start, job["start"] + stop)
            return np.stack([self._prefix(augment_images(images, image_seeds(self.settings["seed"], v, idx),
                                                         self.settings)) for v in range(spec.views)], axis=1)

        return shards.compute_batches(files, self.batch_size, batches, forward, timings)

    def _prefix(self, images):
        import tensorflow as tf

        from tlpipe.features.backbones import preprocess

        x = self.prefix(preprocess(images, self.spec.preprocessing), training=False)
        return np.asarray(tf.cast(x, tf.float32)).astype(self.dtype)


def build_from_manifests(split_dir, images_dir, out, *, backbone, augment, compute, unfreeze_from: str,
                         progress: bool = True, engine=None) -> Path:
    """The viewcache stage: the split manifests -> `out` (params sections as plain arguments;
    `engine`: features.engine.Engine of compute.engine, None: this process)."""
    from tlpipe.features.pretrained import build_base

    split_dir = Path(split_dir)
    classes = read_class_names(split_dir / "classes.json")
    parts = {p: manifest_rows(split_dir / f"{p}.csv", images_dir, classes) for p in SPLITS}
    base = build_base(backbone.name, backbone.weights, backbone.image_size, compute.precision)
    spec = CacheSpec.from_params(backbone, augment, compute, unfreeze_from, classes, base)
    return build_cache(out, parts, base=base, spec=spec, batch_size=compute.batch_size, progress=progress,
                       engine=engine)
