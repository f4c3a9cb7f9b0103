"""Find layers in a tlpipe model and run it with taps on inner layers.

tlpipe models nest the conv base as a sub-model named "base"; a tensor inside that sub-model is not
connected to the outer model's input, so `keras.Model(model.input, inner_layer.output)` fails with
"Graph disconnected". We split the forward pass instead: outer layers up to the base, the base with
taps, then the outer layers after it. Flattened models (no nested base) are tapped directly.
Layers are found by type, never by backbone-specific names.
"""
from __future__ import annotations

from dataclasses import dataclass

import keras

CONV_TYPES = (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D)
POOL_TYPES = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)


def _rank(layer) -> int:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):  # a layer never called has no output
        return 0


def _is_spatial(layer) -> bool:
    return _rank(layer) == 4 and not isinstance(layer, keras.layers.InputLayer)


def find_base(model: keras.Model) -> keras.Model | None:
    """The nested conv base: the sub-model named "base", else the nested model with most conv layers."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    for layer in nested:
        if layer.name == "base":
            return layer
    counts = [(sum(isinstance(x, CONV_TYPES) for x in m.layers), i) for i, m in enumerate(nested)]
    counts = [c for c in counts if c[0] > 0]
    if not counts:
        return None
    return nested[max(counts)[1]]


def base_layers(model: keras.Model) -> list:
    """Layers of the conv base in graph order (the model's own layers when the base is flattened)."""
    base = find_base(model)
    return list((base or model).layers)


def conv_pool_layers(model: keras.Model) -> list:
    """Conv and pooling layers of the base with a spatial (4-D) output, in order."""
    return [layer for layer in base_layers(model)
            if isinstance(layer, CONV_TYPES + POOL_TYPES) and _is_spatial(layer)]


def conv_layers(model: keras.Model) -> list:
    return [layer for layer in base_layers(model) if isinstance(layer, CONV_TYPES) and _is_spatial(layer)]


def last_conv_layer(model: keras.Model):
    """Grad-CAM's default layer: the last spatial layer of the base that is not a trailing pooling.

    Taking the last 4-D layer rather than the last Conv2D picks the activated block output where
    architectures end with BN/activation/add (resnet50 conv5_block3_out, xception
    block14_sepconv2_act, mobilenet conv_pw_13_relu) and block5_conv3 for VGG.
    """
    spatial = [layer for layer in base_layers(model) if _is_spatial(layer)]
    while spatial and isinstance(spatial[-1], POOL_TYPES + (keras.layers.ZeroPadding2D,)):
        spatial.pop()
    if not spatial or not any(isinstance(layer, CONV_TYPES) for layer in spatial):
        raise ValueError(f"model {model.name!r} has no convolutional layer")
    return spatial[-1]


def get_base_layer(model: keras.Model, name: str):
    """A layer of the base (or of the model) by name, or None."""
    for layer in base_layers(model) + list(model.layers):
        if layer.name == name:
            return layer
    return None


@dataclass
class Tap:
    """Callable forward pass returning (tapped outputs, model output or None).

    Calls go through `Functional.call` (not `__call__`) so the outer input's fixed size is not
    enforced: filter visualisation runs the conv layers on smaller images than the model's.
    """

    pre: keras.Model | None
    inner: keras.Model
    post: keras.Model | None
    n_taps: int

    def __call__(self, x):
        h = self.pre.call(x, training=False) if self.pre is not None else x
        outs = self.inner.call(h, training=False)
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        taps = outs[: self.n_taps]
        if self.post is None:
            return taps, (outs[self.n_taps] if len(outs) > self.n_taps else None)
        return taps, self.post.call(outs[self.n_taps], training=False)


def _one(inputs):
    # a one-element list would make Keras warn on every call that a bare tensor doesn't match it
    return inputs[0] if len(inputs) == 1 else inputs


def tap(model: keras.Model, layer_names: list[str], with_output: bool = True) -> Tap:
    """Build a forward pass of `model` that also returns the outputs of `layer_names`.

    The layers must all live in the nested base, or all in the model's top level.
    """
    base = find_base(model)
    top = {layer.name for layer in model.layers}
    if base is None or all(name in top for name in layer_names):
        outs = [model.get_layer(n).output for n in layer_names]
        extra = list(model.outputs) if with_output else []
        return Tap(None, keras.Model(_one(model.inputs), outs + extra), None, len(layer_names))
    # The base's call in the outer graph: its input/output tensors there (Keras keeps them on the
    # inbound node only; `base.output` is the tensor inside the sub-model).
    node = base._inbound_nodes[0]
    pre = keras.Model(_one(model.inputs), node.input_tensors[0])
    outs = [base.get_layer(n).output for n in layer_names]
    if with_output:
        inner = keras.Model(_one(base.inputs), outs + list(base.outputs))
        post = keras.Model(node.output_tensors[0], model.outputs[0])
    else:
        inner, post = keras.Model(_one(base.inputs), outs), None
    return Tap(pre, inner, post, len(layer_names))
