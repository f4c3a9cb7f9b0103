"""Augmentation: each parameter does what its name says, seeds reproduce, the preview is a grid."""


import numpy as np
import pytest
from imagegen import write_exif_rotated_jpeg
from PIL import Image

from tlpipe.features.augment import (apply_transforms, augment_images, augment_settings, image_seeds,
                                    random_transforms)
from tlpipe.features.augment_preview import preview
from tlpipe.runtime.errors import ConfigError, DataError

S = 32


def rand_images(n, size=S, seed=0):
    return np.random.RandomState(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def square_image(size=S, lo=12, hi=20):
    img = np.zeros((1, size, size, 3), np.float32)
    img[0, lo:hi, lo:hi] = 255.0
    return img


def centroid(img):
    m = img[..., 0]
    ys, xs = np.mgrid[: m.shape[0], : m.shape[1]]
    return (m * xs).sum() / m.sum(), (m * ys).sum() / m.sum()


def aug(images, seed=1, view=0, **kw):
    s = augment_settings(dict(kw, seed=seed))
    return augment_images(images, image_seeds(seed, view, np.arange(len(images))), s).numpy()


def test_no_transform_is_identity():
    imgs = rand_images(4)
    np.testing.assert_array_equal(aug(imgs), imgs)
    # shift range 0 with every other transform off changes nothing either
    np.testing.assert_array_equal(aug(imgs, width_shift_range=0.0, height_shift_range=0.0), imgs)


def test_horizontal_flip_mirrors_about_half_the_images():
    imgs = rand_images(64)
    out = aug(imgs, horizontal_flip=True)
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, imgs)]
    kept = [np.array_equal(o, i) for o, i in zip(out, imgs)]
    assert all(f != k for f, k in zip(flipped, kept))  # each one is exactly one of the two
    assert 16 < sum(flipped) < 48


def test_width_shift_moves_content_horizontally_within_range():
    img = np.repeat(square_image(), 40, axis=0)
    s = augment_settings(dict(width_shift_range=0.25, fill_mode="constant", seed=3))
    seeds = image_seeds(3, 0, np.arange(40))
    out = augment_images(img, seeds, s).numpy()
    t = random_transforms(s, seeds, S, S).numpy()
    np.testing.assert_allclose(t[:, [0, 1, 3, 4]], [[1, 0, 0, 1]] * 40, atol=1e-6)  # pure translation
    cx0, cy0 = centroid(img[0])
    moves = []
    for o, tr in zip(out, t):
        cx, cy = centroid(o)
        assert cy == pytest.approx(cy0, abs=1e-3)
        assert cx - cx0 == pytest.approx(-tr[2], abs=1e-3)  # content moves by the drawn shift
        moves.append(cx - cx0)
    moves = np.array(moves)
    assert np.abs(moves).max() <= 0.25 * S + 1e-4
    assert moves.min() < -2 and moves.max() > 2  # both directions, more than a pixel


def test_height_shift_moves_content_vertically():
    img = np.repeat(square_image(), 20, axis=0)
    out = aug(img, seed=5, height_shift_range=0.2, fill_mode="constant")
    cx0, cy0 = centroid(img[0])
    dys = [centroid(o)[1] - cy0 for o in out]
    assert all(centroid(o)[0] == pytest.approx(cx0, abs=1e-3) for o in out)
    assert max(abs(d) for d in dys) <= 0.2 * S + 1e-4 and max(abs(d) for d in dys) > 2


def shift_right(k):
    # output pixel x reads input x - k: content moves right by k pixels
    return np.array([[1, 0, -k, 0, 1, 0, 0, 0]], np.float32)


@pytest.mark.parametrize("mode", ["constant", "nearest", "wrap", "reflect"])
def test_fill_mode_fills_as_named(mode):
    ramp = np.tile((np.arange(8, dtype=np.float32) * 10 + 5)[None, None, :, None], (1, 8, 1, 3))
    out = apply_transforms(ramp, shift_right(3), mode).numpy()[0, 0, :, 0]
    row = ramp[0, 0, :, 0]
    np.testing.assert_allclose(out[3:], row[:5])
    expected = {"constant": [0, 0, 0], "nearest": [row[0]] * 3, "wrap": row[5:8],
                "reflect": row[2::-1]}[mode]
    np.testing.assert_allclose(out[:3], expected)


def test_fill_mode_applies_in_augment():
    img = np.full((8, S, S, 3), 200.0, np.float32)
    out_c = aug(img, seed=2, width_shift_range=0.4, fill_mode="constant")
    out_n = aug(img, seed=2, width_shift_range=0.4, fill_mode="nearest")
    assert (out_c == 0).any() and not (out_n < 199.9).any()


def test_zoom_scales_about_the_centre():
    s = augment_settings(dict(zoom_range=0.3, seed=4))
    t = random_transforms(s, image_seeds(4, 0, np.arange(50)), S, S).numpy()
    mags = 1 / t[:, 0]
    np.testing.assert_allclose(t[:, 0], t[:, 4], rtol=1e-6)  # same on both axes
    np.testing.assert_allclose(t[:, [1, 3]], 0, atol=1e-7)
    assert mags.min() >= 0.7 - 1e-5 and mags.max() <= 1.3 + 1e-5 and mags.min() < 0.9 and mags.max() > 1.1
    img = np.repeat(square_image(), 50, axis=0)
    out = augment_images(img, image_seeds(4, 0, np.arange(50)), augment_settings(dict(zoom_range=0.3, seed=4,
                                                                               fill_mode="constant"))).numpy()
    area = (out[..., 0] > 127).sum(axis=(1, 2))
    # bigger magnification -> bigger square; the square stays centred
    assert np.corrcoef(mags, area)[0, 1] > 0.9
    assert all(centroid(o)[0] == pytest.approx(centroid(img[0])[0], abs=0.05) for o in out)


def test_rotation_is_a_rotation_within_range():
    s = augment_settings(dict(rotation_range=40, seed=6))
    t = random_transforms(s, image_seeds(6, 0, np.arange(50)), S, S).numpy()
    det = t[:, 0] * t[:, 4] - t[:, 1] * t[:, 3]
    np.testing.assert_allclose(det, 1, rtol=1e-5)
    angles = np.degrees(np.arctan2(t[:, 1], t[:, 0]))
    assert np.abs(angles).max() <= 40 + 1e-3 and angles.min() < -15 and angles.max() > 15
    imgs = rand_images(4)
    assert not np.allclose(aug(imgs, seed=6, rotation_range=40), imgs)


def test_shear_is_a_shear_factor():
    s = augment_settings(dict(shear_range=0.2, seed=7))
    t = random_transforms(s, image_seeds(7, 0, np.arange(50)), S, S).numpy()
    np.testing.assert_allclose(t[:, [0, 3, 4]], [[1, 0, 1]] * 50, atol=1e-6)
    factors = -t[:, 1]
    assert np.abs(factors).max() <= 0.2 + 1e-6 and np.abs(factors).max() > 0.15


def test_seeds_reproduce_and_differ():
    imgs = rand_images(6)
    kw = dict(rotation_range=30, width_shift_range=0.1, zoom_range=0.2, shear_range=0.1,
              horizontal_flip=True)
    a, b = aug(imgs, seed=9, **kw), aug(imgs, seed=9, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, aug(imgs, seed=10, **kw))
    assert not np.allclose(a, aug(imgs, seed=9, view=1, **kw))
    # an image's view does not depend on its batch: augment image 4 alone with its index
    s = augment_settings(dict(kw, seed=9))
    alone = augment_images(imgs[4:5], image_seeds(9, 0, [4]), s).numpy()
    np.testing.assert_array_equal(alone[0], a[4])


def test_bad_settings_are_refused_when_params_are_read_naming_the_key():
    # augment_settings trusts its section: the bounds are config.AugmentParams', checked once.
    from tlpipe.config import validate_params

    for key, bad in [("fill_mode", "mirror"), ("zoom_range", 1.5), ("seed", -1), ("rotation_range", 181.0)]:
        with pytest.raises(ConfigError, match=f"augment.{key}"):
            validate_params({"augment": {key: bad}})
    settings = augment_settings(validate_params({"augment": {"rotation_range": 40}}).augment)
    assert settings["rotation_range"] == 40.0 and isinstance(settings["rotation_range"], float)


def test_preview_writes_a_deterministic_grid(tmp_path):
    src = tmp_path / "cat.png"
    Image.fromarray(rand_images(1, 40)[0].astype(np.uint8)).save(src)
    params = dict(rotation_range=40, width_shift_range=0.2, horizontal_flip=True, seed=1)
    a = preview(src, tmp_path / "a.png", params, n=8, image_size=32)
    b = preview(src, tmp_path / "b.png", params, n=8, image_size=32)
    assert a.read_bytes() == b.read_bytes()
    grid = np.asarray(Image.open(a))
    assert grid.shape == (3 * 32 + 4 * 4, 3 * 32 + 4 * 4, 3)  # original + 8 views, 3x3
    tiles = [grid[4 + r * 36: 36 + r * 36, 4 + c * 36: 36 + c * 36] for r in range(3) for c in range(3)]
    assert len({t.tobytes() for t in tiles}) == 9
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(DataError, match="missing.png"):
        preview(tmp_path / "missing.png", tmp_path / "c.png", params)


def test_preview_command_uses_the_first_training_image(tmp_path):
    import yaml

    from tlpipe.cli.augment_preview import main as preview_main

    imgs = tmp_path / "images"
    imgs.mkdir()
    for i, name in enumerate(["b.png", "a.png"]):
        Image.fromarray(rand_images(1, 40, seed=i)[0].astype(np.uint8)).save(imgs / name)
    (tmp_path / "train.csv").write_text("path,class_name,label,sha256,file\ncat/1.png,cat,0,x,b.png\n"
                                        "dog/2.png,dog,1,y,a.png\n")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"backbone": {"image_size": 32}, "augment": {"rotation_range": 30.0}}))
    out = preview_main(["--first-of", str(tmp_path / "train.csv"), "--images", str(imgs), "--out",
                        str(tmp_path / "p.png"), "-n", "3", "--params", str(params)])
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 32 + 3 * 4, 2 * 32 + 3 * 4, 3)  # original + 3 views, 2x2
    from tlpipe.features.imagefile import decode_file

    tile = grid[4:36, 4:36].astype(float)  # top-left: the manifest's first row (b.png), unaugmented
    np.testing.assert_allclose(tile, np.round(decode_file(imgs / "b.png", 32)), atol=0.5)
    with pytest.raises(SystemExit):
        preview_main(["--out", str(tmp_path / "q.png"), "--params", str(params)])  # no image given


def test_preview_of_a_user_photo_is_normalised_like_training_images(tmp_path):
    """An EXIF-rotated JPEG is previewed upright, as the data stage would store it, not as stored."""
    import tensorflow as tf

    from tlpipe.features.imagefile import decode_file
    from tlpipe.features.inputs import decode_resized

    photo = write_exif_rotated_jpeg(tmp_path / "rot.jpg", size=(60, 40), orientation=6)
    out = preview(photo, tmp_path / "p.png", dict(rotation_range=40, seed=1), n=1, image_size=32)
    tile = np.asarray(Image.open(out))[4:36, 4:36].astype(float)
    upright = np.round(decode_file(photo, 32))
    as_stored = np.round(decode_resized(tf.io.read_file(str(photo)), 32).numpy())
    assert np.abs(upright - as_stored).max() > 20  # the rotation is visible at this size
    np.testing.assert_allclose(tile, upright, atol=0.5)
