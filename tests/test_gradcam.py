"""Grad-CAM on hand-set conv nets whose answer is known: a bright patch decides the class."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

keras = pytest.importorskip("keras")

from tlpipe.runtime.errors import ConfigError, DataError  # noqa: E402
from tlpipe.report import graph  # noqa: E402
from tlpipe.report.gradcam import gradcam, overlay, pick_examples  # noqa: E402

SIZE = 32


def _set_detector_weights(conv1, conv2):
    # conv1 ch0 fires on bright pixels (mean > 0.6), ch1 on dark ones; conv2 copies both through
    k = np.zeros((3, 3, 3, 2), np.float32)
    k[..., 0], k[..., 1] = 1 / 27, -1 / 27
    conv1.set_weights([k, np.array([-0.6, 0.4], np.float32)])
    conv2.set_weights([np.eye(2, dtype=np.float32)[None, None], np.zeros(2, np.float32)])


def _set_head(head, softmax: bool):
    # class 1 ("patch") <- mean bright-activation; the dark channel speaks for class 0
    if softmax:
        head.set_weights([np.array([[-200.0, 200.0], [5.0, -5.0]], np.float32), np.array([0, -1.5], np.float32)])
    else:
        head.set_weights([np.array([[200.0], [-5.0]], np.float32), np.array([-1.5], np.float32)])


def patch_model(nested: bool = True, softmax: bool = False, frozen: bool = True) -> keras.Model:
    """image -> preprocess -> base(conv, pool, conv) -> pool -> head_out, in tlpipe's layout."""
    def conv_stack(x):
        x = keras.layers.Conv2D(2, 3, padding="same", activation="relu", name="conv1")(x)
        x = keras.layers.MaxPooling2D(name="pool1")(x)
        return keras.layers.Conv2D(2, 1, activation="relu", name="conv2")(x)

    image = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="preprocess")(image)
    if nested:
        inner = keras.Input((SIZE, SIZE, 3))
        base = keras.Model(inner, conv_stack(inner), name="base")
        base.trainable = not frozen
        x = base(x)
    else:
        x = conv_stack(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(2 if softmax else 1, activation="softmax" if softmax else "sigmoid",
                             name="head_out")(x)
    model = keras.Model(image, out)
    _set_detector_weights(graph.get_base_layer(model, "conv1"), graph.get_base_layer(model, "conv2"))
    _set_head(model.get_layer("head_out"), softmax)
    return model


def patch_image(corner: str, size=(SIZE, SIZE), seed=0) -> np.ndarray:
    """Dark noise with a bright 8 px square in one corner."""
    rng = np.random.default_rng(seed)
    img = rng.uniform(0, 60, size + (3,)).astype(np.float32)
    h, w = size
    ys = slice(0, 8) if corner[0] == "t" else slice(h - 8, h)
    xs = slice(0, 8) if corner[1] == "l" else slice(w - 8, w)
    img[ys, xs] = 250.0
    return img


def quadrant(heatmap) -> str:
    y, x = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    h, w = heatmap.shape
    return ("t" if y < h / 2 else "b") + ("l" if x < w / 2 else "r")


@pytest.mark.parametrize("nested", [True, False], ids=["nested-base", "flat-base"])
@pytest.mark.parametrize("corner", ["tl", "tr", "bl", "br"])
def test_heatmap_peaks_on_the_deciding_patch(nested, corner):
    model = patch_model(nested=nested)
    img = patch_image(corner)
    assert float(model.predict(img[None], verbose=0)[0, 0]) > 0.5  # the patch really decides it
    heat = gradcam(model, img)  # predicted class, automatic layer
    assert heat.shape == (SIZE, SIZE) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    assert quadrant(heat) == corner
    # the patch region carries most of the map's mass
    ys, xs = np.nonzero(patch_image(corner)[..., 0] == 250.0)
    assert heat[ys, xs].mean() > 3 * heat.mean()


def test_automatic_layer_is_the_last_conv_and_explicit_layer_works():
    model = patch_model()
    assert graph.last_conv_layer(model).name == "conv2"
    img = patch_image("br")
    heat = gradcam(model, img, class_index=1, layer="conv1")  # full-resolution layer
    assert quadrant(heat) == "br"
    with pytest.raises(ConfigError, match="gradcam_layer"):
        gradcam(model, img, layer="no_such_layer")


def test_softmax_head_and_class_choice():
    model = patch_model(softmax=True)
    img = patch_image("tr")
    probs = model.predict(img[None], verbose=0)[0]
    assert probs.argmax() == 1
    assert quadrant(gradcam(model, img, class_index=1)) == "tr"
    # evidence for "no patch" is the dark background, away from the patch
    heat0 = gradcam(model, img, class_index=0)
    assert heat0[:8, -8:].mean() < heat0.mean()


def test_nothing_speaks_for_the_class_gives_zeros_not_nan():
    model = patch_model()  # sigmoid: class 0 evidence is only the weakly weighted dark channel
    dark = np.full((SIZE, SIZE, 3), 250.0, np.float32)  # all bright: no dark pixel anywhere
    heat = gradcam(model, dark, class_index=0)
    assert np.all(np.isfinite(heat)) and heat.max() == 0.0


def test_heatmap_has_the_size_of_any_input_image():
    model = patch_model()
    img = patch_image("bl", size=(60, 44))
    heat = gradcam(model, img, class_index=1)  # resized to 32 px for the model, map back to 60 x 44
    assert heat.shape == (60, 44)
    assert quadrant(heat) == "bl"


def test_overlay_blends_jet_colours():
    img = np.full((10, 12, 3), 100, np.float32)
    heat = np.zeros((10, 12), np.float32)
    heat[:, 6:] = 1.0
    out = overlay(img, heat, alpha=0.5)
    assert out.shape == (10, 12, 3) and out.dtype == np.uint8
    # jet: 0 is dark blue, 1 is dark red
    assert out[0, 0, 2] > out[0, 0, 0] and out[0, -1, 0] > out[0, -1, 2]
    assert np.array_equal(overlay(img, heat, alpha=0.0), img.astype(np.uint8))


def test_pick_examples_most_confident_right_and_worst_wrong():
    rows = []
    rng = np.random.default_rng(3)
    for i in range(40):
        true = ["cat", "dog"][i % 2]
        p_dog = float(rng.uniform())
        rows.append({"path": f"{true}/{i:03d}.jpg", "true": true,
                     "predicted": "dog" if p_dog >= 0.5 else "cat", "p_cat": 1 - p_dog, "p_dog": p_dog})
    pred = pd.DataFrame(rows)
    got = pick_examples(pred, ["cat", "dog"], per_class=2)
    for c in ["cat", "dog"]:
        mine = pred[pred["true"] == c]
        right = mine[mine["predicted"] == c][f"p_{c}"].sort_values(ascending=False).head(2).tolist()
        wrong = mine[mine["predicted"] != c][f"p_{c}"].sort_values().head(2).tolist()
        sel = got[got["true"] == c]
        assert sel[sel["category"] == "right"]["p_true"].tolist() == pytest.approx(right)
        assert sel[sel["category"] == "wrong"]["p_true"].tolist() == pytest.approx(wrong)
    # label indices are accepted too
    idx = pred.assign(true=pred["true"].map({"cat": 0, "dog": 1}),
                      predicted=pred["predicted"].map({"cat": 0, "dog": 1}))
    assert pick_examples(idx, ["cat", "dog"], 2)["path"].tolist() == got["path"].tolist()
    with pytest.raises(DataError, match="p_dog"):
        pick_examples(pred.drop(columns="p_dog"), ["cat", "dog"], 2)


@pytest.mark.parametrize("arch,ctor,last", [("resnet50", "ResNet50", "conv5_block3_out"),
                                             ("mobilenet", "MobileNet", "conv_pw_13_relu")])
def test_keras_applications_bases_nested_with_branches(arch, ctor, last):
    """Residual branches and depthwise convs inside a frozen nested base: layers found by type."""
    base = getattr(keras.applications, ctor)(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    nested = keras.Model(base.input, base.output, name="base")
    nested.trainable = False
    image = keras.Input((SIZE, SIZE, 3), name="image")
    x = nested(keras.layers.Rescaling(1 / 127.5, offset=-1, name="preprocess")(image))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(image, keras.layers.Dense(3, activation="softmax", name="head_out")(x))
    assert graph.last_conv_layer(model).name == last
    img = np.random.default_rng(0).uniform(0, 255, (SIZE, SIZE, 3)).astype(np.float32)
    for c in range(3):
        heat = gradcam(model, img, class_index=c)
        assert heat.shape == (SIZE, SIZE) and np.all(np.isfinite(heat))
        assert heat.min() >= 0 and heat.max() <= 1
    # the first conv of the base can be tapped too (its map is bigger than the last one's 1 x 1)
    first = graph.conv_layers(model)[0].name
    assert gradcam(model, img, class_index=0, layer=first).shape == (SIZE, SIZE)
