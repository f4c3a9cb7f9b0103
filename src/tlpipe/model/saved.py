"""The saved-model format: a complete classifier from RGB images (float 0..255) to probabilities.

Layout (names are the contract other modules rely on):

    image (Input) -> preprocess (Preprocess: backbone preprocessing + metadata in its config)
      -> base (the backbone truncated at `layer`, a nested sub-model as in the book's
               `model.add(conv_base)`) -> pool (Flatten / GlobalAverage / GlobalMax)
      -> head_dense -> head_dropout -> head_out (copied from the trained head)

The `Preprocess` config carries what a user of the file needs: class names, image size, backbone,
weights (+ SHA-256 of the file), layer, pooling, preprocessing mode, the first trainable base layer
and the tlpipe version. Files are written atomically and without timestamps (byte-identical reruns).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import keras

from tlpipe import __version__

from tlpipe import atomic
from tlpipe.runtime.errors import FeatureFileError, ModelFileError
from tlpipe.config.choices import POOLINGS
from tlpipe.features.backbones import pool_layer
from tlpipe.model.dense_head import HEAD_LAYERS, head_layers

# Keys of the metadata dict (model_info); assemble fills tlpipe_version itself.
INFO_KEYS = (
    "class_names", "image_size", "backbone", "weights", "weights_sha256", "layer", "pooling",
    "preprocessing", "trainable_from", "tlpipe_version",
)
# The metadata that says which features a head consumes: feature files and models must agree on it.
FEATURE_KEYS = ("backbone", "weights", "weights_sha256", "layer", "pooling", "image_size", "preprocessing",
                "class_names")
_REQUIRED = ("class_names", "image_size", "backbone", "weights", "pooling", "preprocessing")
# Keras stamps the save time into metadata.json and the zip entries; we pin both.
_FIXED_DATE = "1980-01-01@00:00:00"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@keras.saving.register_keras_serializable("tlpipe")
class Preprocess(keras.layers.Layer):
    """RGB float 0..255 -> what the backbone's weights expect; its config holds the model's metadata."""

    def __init__(self, mode: str = "none", info: dict | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        from tlpipe.features.backbones import PREPROCESSING_MODES

        if mode not in PREPROCESSING_MODES:
            raise ModelFileError(f"unknown preprocessing mode {mode!r}; choose from {', '.join(PREPROCESSING_MODES)}")
        self.mode = mode
        self.info = dict(info or {})
        self.info["preprocessing"] = mode

    def call(self, images):
        from tlpipe.features.backbones import preprocess

        return preprocess(images, self.mode)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"mode": self.mode, "info": dict(self.info)})
        return config


def _check_info(info: dict) -> dict:
    unknown = sorted(set(info) - set(INFO_KEYS))
    missing = [k for k in _REQUIRED if info.get(k) is None]
    if unknown or missing:
        raise ModelFileError(
            f"model metadata: unknown keys {unknown} / missing keys {missing}; expected {', '.join(INFO_KEYS)}"
        )
    out = {k: info.get(k) for k in INFO_KEYS}
    out["class_names"] = [str(c) for c in info["class_names"]]
    out["image_size"] = int(info["image_size"])
    out["tlpipe_version"] = __version__
    return out


def truncate_base(base: keras.Model, layer: str | None) -> keras.Model:
    """The base up to `layer` (None: the whole base) as a model named "base", sharing its layers."""
    from tlpipe.features.backbones import resolve_layer

    layer = resolve_layer(base, layer)
    return keras.Model(base.inputs, base.get_layer(layer).output, name="base")


def assemble(base: keras.Model, layer: str | None, pooling: str, head: keras.Model, info: dict,
             name: str = "classifier") -> keras.Model:
    """Full classifier: Input -> Preprocess -> base (truncated at `layer`, nested) -> pool -> head.

    `base` is a convolutional base (e.g. `pretrained.build_base(...)`); `head` a trained model from
    `dense_head.build_head` whose weights are copied. `info` holds the metadata (see INFO_KEYS);
    `info["trainable_from"]` (default None = frozen base) sets which base layers train.
    """
    if pooling not in POOLINGS:
        raise ModelFileError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    info = _check_info({**info, "layer": info.get("layer", layer), "pooling": pooling})
    size = info["image_size"]
    sub = truncate_base(base, layer)
    info["layer"] = sub.layers[-1].name
    images = keras.Input(shape=(size, size, 3), name="image", dtype="float32")
    x = Preprocess(info["preprocessing"], info, name="preprocess")(images)
    x = sub(x)
    # float32 like backbones.feature_model, so the pooled values equal the stored features.
    x = pool_layer(pooling, dtype="float32", name="pool")(x)
    width = int(x.shape[-1])
    want = int(head.get_layer(HEAD_LAYERS[0]).kernel.shape[0])
    if width != want:
        raise FeatureFileError(
            f"the head takes {want} features but {info['backbone']} at layer {info['layer']} with "
            f"pooling {pooling} gives {width}; the features were extracted with other settings: rerun the "
            f"extract stage (`dvc repro extract`)"
        )
    copies = []
    for lname in head_layers(head):
        src = head.get_layer(lname)
        copy = src.__class__.from_config(src.get_config())
        x = copy(x)
        copies.append((copy, src))
    model = keras.Model(images, x, name=name)
    for copy, src in copies:
        copy.set_weights(src.get_weights())
    set_trainable_from(model, info.get("trainable_from"))
    return model


def set_trainable_from(model: keras.Model, layer: str | None) -> None:
    """Freeze the base up to `layer` (None: all of it), as in the book's fine-tuning; record it."""
    base = model.get_layer("base")
    names = [lyr.name for lyr in base.layers]
    if layer is not None and layer not in names:
        raise ModelFileError(f"trainable_from: the base has no layer {layer!r}; choose one of {', '.join(names)}")
    base.trainable = layer is not None
    if layer is not None:
        on = False
        for lyr in base.layers:
            on = on or lyr.name == layer
            lyr.trainable = on
    model.get_layer("preprocess").info["trainable_from"] = layer


def model_info(model: keras.Model) -> dict:
    """The metadata dict carried by the model's Preprocess layer (ModelFileError if it has none)."""
    try:
        layer = model.get_layer("preprocess")
    except ValueError:
        layer = None
    if not isinstance(layer, Preprocess):
        raise ModelFileError(f"model {model.name!r} has no tlpipe Preprocess layer: not a tlpipe model")
    return {k: layer.info.get(k) for k in INFO_KEYS}


def head_submodel(model: keras.Model) -> keras.Model:
    """Pooled features -> probabilities, sharing the full model's head layers (for stored features)."""
    try:
        layers = [model.get_layer(n) for n in head_layers(model)]
    except ValueError:
        raise ModelFileError(f"model {model.name!r} lacks the head layers {', '.join(HEAD_LAYERS)}") from None
    width = int(model.get_layer(HEAD_LAYERS[0]).kernel.shape[0])
    features = keras.Input(shape=(width,), name="features", dtype="float32")
    x = features
    for layer in layers:
        x = layer(x)
    return keras.Model(features, x, name=f"{model.name}_head")


def _renumber_shared(config, ids: dict | None = None):
    """Keras writes id() of shared objects (dtype policies) as shared_object_id: memory addresses that
    change every run. Renumber them 1, 2, ... in order of appearance; only equality matters to Keras."""
    ids = {} if ids is None else ids
    if isinstance(config, dict):
        out = {}
        for key, value in config.items():
            if key == "shared_object_id" and isinstance(value, int):
                out[key] = ids.setdefault(value, len(ids) + 1)
            else:
                out[key] = _renumber_shared(value, ids)
        return out
    if isinstance(config, list):
        return [_renumber_shared(v, ids) for v in config]
    return config


def _pin_zip(src: Path, dst: Path) -> None:
    """Copy the .keras zip with the save date and entry times fixed, so identical models give identical bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "metadata.json":
                meta = json.loads(data)
                meta["date_saved"] = _FIXED_DATE
                data = json.dumps(meta).encode()
            elif item.filename == "config.json":
                data = json.dumps(_renumber_shared(json.loads(data))).encode()
            info = zipfile.ZipInfo(item.filename, date_time=_ZIP_TIME)
            info.compress_type = item.compress_type
            info.external_attr = 0o644 << 16
            zout.writestr(info, data)


def save_model(model: keras.Model, path: str | os.PathLike) -> Path:
    """Save atomically: write and pin under temp names in the same folder, then os.replace."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ModelFileError(f"{path}: model files must end in .keras")
    model_info(model)  # refuse to write a file that load_model would reject
    with atomic.target(path) as tmp:
        raw = tmp.with_suffix(".raw.keras")  # keras insists on a name ending .keras
        try:
            model.save(raw)
            _pin_zip(raw, tmp)
        finally:
            raw.unlink(missing_ok=True)
    return path


def load_model(path: str | os.PathLike, compile: bool = False) -> keras.Model:  # noqa: A002 - keras' name
    """Load a tlpipe model; ModelFileError when it is missing, damaged or not a tlpipe model."""
    from tlpipe.runtime import threads

    threads.ensure()  # before the weights become tensors: the pool's size decides the bits (tlpipe.runtime.threads)
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found; run the stage that writes it (dvc repro)")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not a Keras .keras archive (damaged or truncated?); delete it and rerun its stage")
    try:
        with zipfile.ZipFile(path) as zf:
            config = json.loads(zf.read("config.json"))
    except (KeyError, ValueError, zipfile.BadZipFile, OSError) as exc:
        raise ModelFileError(f"{path}: damaged .keras archive ({exc}); delete it and rerun its stage") from None
    if '"Preprocess"' not in json.dumps(config) or "tlpipe" not in json.dumps(config):
        raise ModelFileError(f"{path}: a Keras model without tlpipe metadata (no Preprocess layer); "
                             f"use a model written by tlpipe")
    try:
        model = keras.saving.load_model(path, compile=compile)
    except Exception as exc:  # Keras raises many types for a damaged file; all mean the same to the user
        raise ModelFileError(f"{path}: cannot be loaded ({type(exc).__name__}: {exc}); "
                             f"delete it and rerun its stage") from None
    model_info(model)
    return model
