"""The augmented-activation cache: the frozen part of the base, run once over augmented views.

The book trains `conv_base + head` on freshly augmented images every epoch, running the whole
frozen base each time. The frozen part never changes, so we split the base at the freeze boundary
(the layer just before `finetune.unfreeze_from`: block4_pool for VGG16's block5_conv1, which `auto`
picks when backbone.layer is block5_pool; block3_pool for block4_conv1, auto's pick at block4_pool), run the
frozen PREFIX once over `views` augmented copies of each training image and over the plain
validation and test images, and store its activations (float16) in one HDF5 file. Training then runs
only the SUFFIX (block5 here) + pooling + head, each epoch on a different stored view of each image.

File layout (`features/views.h5`):
    /train/activations       float16 [N, views, h, w, c]   view v of image i = augment view v
    /train/labels            int64 [N];   /train/paths  utf-8 [N]
    /validation/..., /test/...  activations [N, h, w, c] of the plain (never augmented) images
    attrs: tlpipe_format, kind="views", mode, backbone, weights, weights_sha256, image_size,
           preprocessing, precision, boundary, unfreeze_from, views, augment (JSON), class_names (JSON)

In `augment.mode: online` the file is a marker: the same attrs, no groups (online training reads
the images themselves, and dvc.yaml cannot make the stage conditional).

Building is resumable with features.py's machinery: finished batches are kept in `.<out>.work/`
(a fingerprint + one .npy per batch, written atomically) until the final file is assembled under a
temp name and renamed; a changed input or setting discards the folder.
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

    def fingerprint(self, parts: dict, batch_size: int, activation_dtype) -> str:
        """Hash of everything the cache bytes depend on; a different one discards saved progress."""
        import keras
        import tensorflow as tf

        # Store files are content-addressed, so name and size identify them (mtime changes on checkout).
        rows = {p: [[os.path.basename(f), os.path.getsize(f), int(l), str(q)] for f, l, q in zip(*parts[p])]
                for p in sorted(parts)}
        blob = json.dumps({"attrs": self.attrs(), "rows": rows, "batch_size": int(batch_size),
                           "dtype": np.dtype(activation_dtype).name,
                           "versions": [tf.__version__, keras.__version__]}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------- building

def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(n, start + batch_size)


def _write_h5(out: Path, spec: CacheSpec, parts: dict, work: Path | None, batch_size: int,
              activation_dtype) -> None:
    """Assemble the final file from the work folder's batches, under a temp name, then rename."""
    import h5py

    with atomic.target(out) as tmp:
        with h5py.File(tmp, "w", libver=("earliest", "v110")) as f:
            for k, v in spec.attrs().items():
                f.attrs[k] = v
            if work is not None:
                for part, (files, labels, paths) in parts.items():
                    g = f.create_group(part, track_order=False)
                    n = len(files)
                    first = np.load(work / f"{part}-000000.npy") if n else None
                    shape = (n,) + (first.shape[1:] if n else ())
                    chunk = (1,) + shape[1:] if n else None
                    d = g.create_dataset("activations", shape=shape, dtype=activation_dtype,
                                         chunks=chunk, track_times=False)
                    for start, stop in _batches(n, batch_size):
                        d[start:stop] = np.load(work / f"{part}-{start:06d}.npy")
                    g.create_dataset("labels", data=np.asarray(labels, np.int64), track_times=False)
                    g.create_dataset("paths", data=np.asarray([str(p) for p in paths], dtype=object),
                                     dtype=h5py.string_dtype("utf-8"), track_times=False)


def build_cache(out_path, parts: dict, *, base, spec: CacheSpec, batch_size: int = 32,
                activation_dtype="float16", progress: bool = True) -> Path:
    """Write the cache for `parts` = {"train"|"validation"|"test": (files, labels, paths)}.

    `base` is the built backbone (its weights as named in `spec`); `spec.mode == "online"` writes the
    marker file only. `activation_dtype` is float16 in the pipeline (float32 for exactness tests)."""
    import tensorflow as tf

    from tlpipe.features.backbones import preprocess
    from tlpipe.features.extract import prepare_work, work_dir
    from tlpipe.features.inputs import read_resized

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if spec.mode not in AUGMENT_MODES:
        raise ConfigError(f"augment.mode: must be one of {', '.join(AUGMENT_MODES)}, got {spec.mode!r}")
    if spec.mode == "online":
        _write_h5(out, spec, parts, None, batch_size, activation_dtype)
        return out
    if int(spec.views) < 1:
        raise ConfigError(f"augment.views: must be >= 1, got {spec.views}")
    settings = augment_settings(spec.augment)
    prefix = prefix_model(base, spec.boundary)
    work = work_dir(out)
    prepare_work(work, spec.fingerprint(parts, batch_size, activation_dtype))

    def images_of(files):
        try:
            return tf.stack([read_resized(tf.constant(str(f)), spec.image_size) for f in files])
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as exc:
            raise DataError(f"cannot read an image among {files[0]} and the {len(files) - 1} after it "
                            f"({exc.message.splitlines()[0]}); rerun the data stage (`dvc repro data`)") from None

    def run_prefix(images):
        x = prefix(preprocess(images, spec.preprocessing), training=False)
        return np.asarray(tf.cast(x, tf.float32)).astype(activation_dtype)

    tf.config.experimental.enable_op_determinism()  # same inputs -> same bytes, also after a resume
    jobs = [(p, s, e) for p in SPLITS if p in parts for s, e in _batches(len(parts[p][0]), batch_size)]
    try:
        _run_jobs(jobs, work, parts, spec, settings, images_of, run_prefix, progress, out.name)
        _write_h5(out, spec, parts, work, batch_size, activation_dtype)
    except OSError as exc:
        raise FeatureFileError(f"{out}: cannot write the view cache ({exc}); fix the folder or free space and "
                               f"rerun the viewcache stage: finished batches in {work} are kept") from None
    shutil.rmtree(work, ignore_errors=True)
    return out


def _run_jobs(jobs, work, parts, spec, settings, images_of, run_prefix, progress, name) -> None:
    from tqdm import tqdm

    from tlpipe.features import extract as features

    def passes(part, start, stop):  # images through the prefix: a training batch runs once per view
        return (stop - start) * (spec.views if part == "train" else 1)

    # Counted in images, not batches: a training batch costs `views` times a validation one, so a
    # bar in batches would promise far too early an end.
    with tqdm(total=sum(passes(*job) for job in jobs), desc=f"view cache -> {name}", unit="img",
              disable=not progress, file=sys.stderr) as bar:
        for part, start, stop in jobs:
            target = work / f"{part}-{start:06d}.npy"
            if not target.exists():
                images = images_of(parts[part][0][start:stop])
                if part == "train":
                    idx = np.arange(start, stop)
                    acts = np.stack([run_prefix(augment_images(images, image_seeds(settings["seed"], v, idx),
                                                               settings)) for v in range(spec.views)], axis=1)
                else:  # validation and test images are never augmented
                    acts = run_prefix(images)
                features.save_chunk(target, acts)
            bar.update(passes(part, start, stop))


# ---------------------------------------------------------------- reading

def read_attrs(path) -> dict:
    """The cache's attrs (decoded); FeatureFileError when missing or not a view cache."""
    import h5py

    from tlpipe.features.extract import plain_attrs

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
                         progress: bool = True) -> Path:
    """The viewcache stage: the split manifests -> `out` (params sections as plain arguments)."""
    from tlpipe.features.backbones import build_base

    split_dir = Path(split_dir)
    classes = read_class_names(split_dir / "classes.json")
    parts = {p: manifest_rows(split_dir / f"{p}.csv", images_dir, classes) for p in SPLITS}
    base = build_base(backbone.name, backbone.weights, backbone.image_size, compute.precision)
    spec = CacheSpec.from_params(backbone, augment, compute, unfreeze_from, classes, base)
    return build_cache(out, parts, base=base, spec=spec, batch_size=compute.batch_size, progress=progress)
