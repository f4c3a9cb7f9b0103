"""The augmented-activation cache: split point, contents, determinism, resumability, equivalence."""


import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import image_parts

from tlpipe.features import viewcache, viewfile
from tlpipe.features.boundary import boundary_layer, prefix_model, resolve_unfreeze
from tlpipe.features.augment import augment_images, augment_settings, image_seeds
from tlpipe.features.backbones import preprocess
from tlpipe.features.pretrained import build_base
from tlpipe.runtime.errors import ConfigError, FeatureFileError
from tlpipe.features.inputs import read_resized
from tlpipe.train.views import epoch_views

SIZE = 32
AUG = dict(rotation_range=20.0, width_shift_range=0.1, height_shift_range=0.1, shear_range=0.1,
           zoom_range=0.1, horizontal_flip=True, fill_mode="nearest", seed=3)


@pytest.fixture(scope="module")
def base():
    return build_base("vgg16", "none", SIZE)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return image_parts(tmp_path_factory.mktemp("imgs"), per_class=5)


def spec_for(base, views=2, mode="cached", unfreeze="block5_conv1"):
    return viewcache.CacheSpec(mode=mode, backbone="vgg16", weights="none", weights_sha256=None,
                               image_size=SIZE, preprocessing="caffe", precision="float32",
                               boundary=boundary_layer(base, unfreeze), unfreeze_from=unfreeze,
                               views=views, augment=augment_settings(AUG), class_names=("cat", "dog"))


def plain_images(files):
    return tf.stack([read_resized(tf.constant(f), SIZE) for f in files])


def test_boundary_is_the_layer_before_unfreeze_from(base):
    assert boundary_layer(base, "block5_conv1") == "block4_pool"
    assert boundary_layer(base, "block4_conv2") == "block4_conv1"
    with pytest.raises(ConfigError, match="block5_conv1.*block5_pool|choose one of.*block5_conv1"):
        boundary_layer(base, "block9_conv1")
    prefix = prefix_model(base, "block4_pool")
    suffix = keras.Model(base.get_layer("block4_pool").output, base.output)  # what training runs on the cache
    x = np.random.RandomState(0).uniform(-100, 100, (2, SIZE, SIZE, 3)).astype("float32")
    np.testing.assert_allclose(suffix(prefix(x)), base(x), rtol=1e-5, atol=1e-6)


def test_cache_contents_views_and_plain_parts(tmp_path, base, parts):
    out = viewcache.build_cache(tmp_path / "views.h5", parts, base=base, spec=spec_for(base), batch_size=4,
                                progress=False)
    prefix = prefix_model(base, "block4_pool")
    with h5py.File(out) as f:
        tr = f["train/activations"][...]
        assert tr.shape == (6, 2, 2, 2, 512) and tr.dtype == np.float16
        assert list(f["train/labels"][...]) == parts["train"][1]
        assert [p.decode() for p in f["train/paths"][...]] == parts["train"][2]
        val = f["validation/activations"][...]
        assert val.shape == (2, 2, 2, 512)
        assert f.attrs["boundary"] == "block4_pool" and f.attrs["views"] == 2
    # validation is the prefix of the plain images: never augmented
    plain = prefix(preprocess(plain_images(parts["validation"][0]), "caffe")).numpy()
    np.testing.assert_allclose(val.astype(np.float32), plain, rtol=2e-3, atol=1e-2)
    # train view v is the prefix of augment view v (index in the train list)
    s = augment_settings(AUG)
    imgs = plain_images(parts["train"][0])
    for v in range(2):
        want = prefix(preprocess(augment_images(imgs, image_seeds(3, v, np.arange(6)), s), "caffe")).numpy()
        np.testing.assert_allclose(tr[:, v].astype(np.float32), want, rtol=2e-3, atol=1e-2)
    assert not np.allclose(tr[:, 0], tr[:, 1])  # views differ
    attrs = viewfile.read_attrs(out)
    assert attrs["augment"]["seed"] == 3 and attrs["class_names"] == ["cat", "dog"]
    with pytest.raises(FeatureFileError, match="views"):
        viewfile.check_attrs(out, attrs, {"views": 10})


def test_cache_is_deterministic_and_resumable(tmp_path, base, parts, monkeypatch):
    spec = spec_for(base)
    a = viewcache.build_cache(tmp_path / "a" / "v.h5", parts, base=base, spec=spec, batch_size=4, rows_per_shard=4,
                              progress=False)
    # interrupt a second build after two shards (4 rows each: train 2, validation 1, test 1), then resume it
    from tlpipe.features import shards

    calls = {"n": 0}
    real = shards.write_shard

    def flaky(path, array):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(path, array)

    monkeypatch.setattr(shards, "write_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        viewcache.build_cache(tmp_path / "b" / "v.h5", parts, base=base, spec=spec, batch_size=4, rows_per_shard=4,
                              progress=False)
    assert not (tmp_path / "b" / "v.h5").exists()
    work = shards.work_dir(tmp_path / "b" / "v.h5")
    assert sorted(p.name for p in work.glob("*.h5")) == ["train-000000.h5", "train-000001.h5"]
    seen = []
    monkeypatch.setattr(shards, "write_shard", lambda p, a: (seen.append(p.name), real(p, a)))
    b = viewcache.build_cache(tmp_path / "b" / "v.h5", parts, base=base, spec=spec, batch_size=4, rows_per_shard=4,
                              progress=False)
    assert seen == ["validation-000000.h5", "test-000000.h5"]  # only the missing shards were computed
    assert a.read_bytes() == b.read_bytes()  # same name: the file maps rows onto v.shards/...
    for name in ("train-000000.h5", "train-000001.h5", "validation-000000.h5", "manifest.json"):
        assert (tmp_path / "a/v.shards" / name).read_bytes() == (tmp_path / "b/v.shards" / name).read_bytes()
    assert not work.exists() and not list(tmp_path.glob("*/.*tmp"))
    with h5py.File(a) as f, h5py.File(b) as g:
        assert f["train/activations"].is_virtual
        np.testing.assert_array_equal(f["train/activations"][...], g["train/activations"][...])
    (tmp_path / "b/v.shards/test-000000.h5").unlink()  # a virtual dataset would read zeros: refused
    with pytest.raises(FeatureFileError, match="test-000000.h5 is missing or damaged"):
        viewfile.load_part(b, "test")


def test_online_mode_writes_a_marker(tmp_path, base, parts):
    out = viewcache.build_cache(tmp_path / "v.h5", parts, base=base, spec=spec_for(base, mode="online"),
                                progress=False)
    assert viewfile.read_attrs(out)["mode"] == "online"
    with h5py.File(out) as f:
        assert list(f) == []
    with pytest.raises(FeatureFileError, match="online"):
        viewfile.ViewReader(out)


def test_epoch_views_are_seeded_and_vary(tmp_path, base, parts):
    out = viewcache.build_cache(tmp_path / "v.h5", parts, base=base, spec=spec_for(base, views=3), batch_size=8,
                                progress=False)
    with viewfile.ViewReader(out) as r, h5py.File(out) as f:
        all_views = f["train/activations"][...]
        x0, y0 = r.read_views(epoch_views(r.n, r.views, 1, 0))
        x0b, _ = r.read_views(epoch_views(r.n, r.views, 1, 0))
        np.testing.assert_array_equal(x0, x0b)
        picks = [epoch_views(6, 3, 1, e) for e in range(5)]
        for i in range(6):
            np.testing.assert_array_equal(x0[i], all_views[i, picks[0][i]].astype(np.float32))
        assert list(y0) == parts["train"][1]
        assert len({tuple(p) for p in picks}) > 1  # views change between epochs


def test_epoch_views_show_every_view_before_repeating():
    n, views = 50, 4
    picks = np.stack([epoch_views(n, views, 7, e) for e in range(3 * views)])  # [epoch, image]
    for cycle in range(3):
        block = np.sort(picks[cycle * views:(cycle + 1) * views], axis=0)
        np.testing.assert_array_equal(block, np.tile(np.arange(views)[:, None], (1, n)))
    assert not np.array_equal(picks[:views], picks[views:2 * views])  # a new order each cycle
    assert not (picks[0] == picks[0][0]).all()  # images are not in lockstep
    np.testing.assert_array_equal(picks[5], epoch_views(n, views, 7, 5))  # resumable


def test_cached_suffix_matches_full_model_loss_and_gradients(tmp_path, parts):
    """Proof of equivalence: training block5 + head on cached block4 activations sees exactly the loss
    and gradients of the full model run end to end on the same augmented images."""
    from tlpipe.train.models import cached_training_model
    from tlpipe.model.dense_head import build_head
    from tlpipe.model.saved import assemble, set_trainable_from

    base = build_base("vgg16", "none", SIZE, seed=5)
    spec = spec_for(base, views=1)
    cache = viewcache.build_cache(tmp_path / "v.h5", parts, base=base, spec=spec, batch_size=4,
                                  activation_dtype="float32", progress=False)
    head = build_head(512, 2, units=8, dropout=0.0, seed=1)
    info = dict(class_names=["cat", "dog"], image_size=SIZE, backbone="vgg16", weights="none", pooling="flatten",
                preprocessing="caffe")
    full = assemble(base, None, "flatten", head, info)
    set_trainable_from(full, "block5_conv1")
    cached = cached_training_model(full, "block4_pool")
    assert [v.path for v in cached.trainable_variables] == [v.path for v in full.trainable_variables]

    with viewfile.ViewReader(cache) as r:
        acts, labels = r.read_views(epoch_views(r.n, r.views, 0, 0))  # one view: view 0 of every image
    images = augment_images(plain_images(parts["train"][0]), image_seeds(3, 0, np.arange(6)),
                            augment_settings(AUG))
    loss_fn = keras.losses.BinaryCrossentropy()
    y = labels.astype("float32")[:, None]

    def loss_and_grads(model, x):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return float(loss), [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]

    lc, gc = loss_and_grads(cached, acts)
    lf, gf = loss_and_grads(full, images)
    assert lc == pytest.approx(lf, rel=1e-5)
    assert len(gc) == 10  # block5_conv1..3, head_dense, head_out: kernels and biases
    for a, b in zip(gc, gf):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(b).max()))
        assert np.abs(a).max() > 0


def test_frozen_suffix_features_equal_running_the_suffix(tmp_path, parts):
    """train_head_aug precomputes the frozen suffix once per view: the head then sees exactly what
    it would see running the suffix every epoch."""
    from tlpipe.train.models import cached_training_model, frozen_features_model
    from tlpipe.model.dense_head import build_head
    from tlpipe.model.saved import assemble, head_submodel

    base = build_base("vgg16", "none", SIZE, seed=6)
    cache = viewcache.build_cache(tmp_path / "v.h5", parts, base=base, spec=spec_for(base, views=2),
                                  batch_size=4, progress=False)
    info = dict(class_names=["cat", "dog"], image_size=SIZE, backbone="vgg16", weights="none",
                pooling="flatten", preprocessing="caffe")
    full = assemble(base, None, "flatten", build_head(512, 2, units=8, dropout=0.0, seed=1), info)
    cached = cached_training_model(full, "block4_pool")
    assert not cached.get_layer("suffix").trainable_variables  # frozen base: nothing in the suffix trains
    feats = frozen_features_model(cached)
    head = head_submodel(full)
    with viewfile.ViewReader(cache) as r, h5py.File(cache) as f:
        per_view = r.map_views(lambda x: feats.predict(x, verbose=0), batch_size=4)
        stored = f["train/activations"][...].astype("float32")
    assert per_view.shape == (6, 2, 512)
    for v in range(2):
        np.testing.assert_allclose(head(per_view[:, v]), cached(stored[:, v]), rtol=1e-5, atol=1e-6)


def test_progress_counts_images_through_the_prefix(tmp_path, base, parts, capsys, monkeypatch):
    """The bar's total is training images x views + plain images, so its ETA is honest."""
    from tlpipe.runtime import log

    monkeypatch.setattr(log, "_stderr_is_terminal", lambda: True)  # bars show only on a terminal
    viewcache.build_cache(tmp_path / "v.h5", parts, base=base, spec=spec_for(base, views=3), batch_size=4,
                          progress=True)
    total = 6 * 3 + 2 + 2
    assert f"{total}/{total}" in capsys.readouterr().err


def test_the_boundary_follows_backbone_layer_when_unfreeze_from_is_auto(base):
    assert resolve_unfreeze("vgg16", base, None, "auto") == "block5_conv1"
    assert resolve_unfreeze("vgg16", base, "block4_pool", "auto") == "block4_conv1"
    assert boundary_layer(base, resolve_unfreeze("vgg16", base, "block4_pool", "auto")) == "block3_pool"
    assert resolve_unfreeze("vgg16", base, "block4_pool", "block3_conv2") == "block3_conv2"
    with pytest.raises(ConfigError, match=r"'block5_conv1' lies after the cut \(backbone.layer: block4_pool\)"):
        resolve_unfreeze("vgg16", base, "block4_pool", "block5_conv1")
    with pytest.raises(ConfigError, match="backbone.layer: vgg16 has no layer 'block9_pool'"):
        resolve_unfreeze("vgg16", base, "block9_pool", "auto")


def test_a_base_not_known_by_name_is_checked_once_built():
    resnet = build_base("resnet50", "none", SIZE)
    assert resolve_unfreeze("resnet50", resnet, "conv4_block6_out", "conv4_block6_1_conv") == "conv4_block6_1_conv"
    with pytest.raises(ConfigError, match="lies after the cut"):
        resolve_unfreeze("resnet50", resnet, "conv4_block6_out", "conv5_block1_1_conv")
    with pytest.raises(ConfigError, match="auto is defined for vgg16 and vgg19"):
        resolve_unfreeze("resnet50", resnet, None, "auto")
