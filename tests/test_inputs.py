"""tf.data image pipeline: decode any store format, resize, preprocess, keep file order."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tlpipe.features import backbones
from tlpipe.features.inputs import image_dataset, read_resized


def solid(path, colour, size=(40, 30), mode="RGB"):
    Image.new("RGB", size, colour).convert(mode).save(path)
    return str(path)


@pytest.fixture
def files(tmp_path):
    # Distinct colours in mixed formats and sizes; each file's row must come back in its place.
    colours = [(10 * i, 255 - 20 * i, (37 * i) % 256) for i in range(7)]
    out = []
    for i, c in enumerate(colours):
        suffix = ".png" if i % 2 else ".jpg"
        out.append(solid(tmp_path / f"img{i}{suffix}", c, size=(20 + 7 * i, 50 - 3 * i)))
    return out, np.array(colours, dtype=np.float32)


def test_raw_batches_keep_order_size_and_range(files):
    paths, colours = files
    batches = list(image_dataset(paths, 32, batch_size=3, preprocess_mode=None))
    assert [b.shape[0] for b in batches] == [3, 3, 1]
    images = np.concatenate([b.numpy() for b in batches])
    assert images.shape == (7, 32, 32, 3) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 255
    # Solid images stay solid through resizing; JPEG's chroma rounding moves them a few levels.
    np.testing.assert_allclose(images.mean(axis=(1, 2)), colours, atol=4)


def test_preprocessing_applied_per_mode(files):
    paths, _ = files
    raw = np.concatenate([b.numpy() for b in image_dataset(paths, 32, 4, None)])
    for mode in ("caffe", "hed-caffe", "tf"):
        pre = np.concatenate([b.numpy() for b in image_dataset(paths, 32, 4, mode)])
        np.testing.assert_allclose(pre, backbones.preprocess(raw, mode).numpy(), rtol=1e-6, atol=1e-4)
        assert not np.allclose(pre, raw)


def test_labels_travel_with_their_images(files):
    paths, colours = files
    labels = [6, 5, 4, 3, 2, 1, 0]
    got_images, got_labels = [], []
    for x, y in image_dataset(paths, 32, 2, None, labels=labels):
        got_images.append(x.numpy())
        got_labels.append(y.numpy())
    assert np.concatenate(got_labels).tolist() == labels
    assert np.concatenate(got_labels).dtype == np.int64
    np.testing.assert_allclose(np.concatenate(got_images).mean(axis=(1, 2)), colours, atol=4)
    with pytest.raises(ValueError, match="labels"):
        image_dataset(paths, 32, 2, None, labels=[0, 1])


def test_grey_and_rgba_files_become_rgb(tmp_path):
    grey = solid(tmp_path / "g.png", (90, 90, 90), mode="L")
    rgba = solid(tmp_path / "a.png", (200, 10, 30), mode="RGBA")
    a = read_resized(grey, 16).numpy()
    b = read_resized(rgba, 16).numpy()
    assert a.shape == b.shape == (16, 16, 3)
    np.testing.assert_allclose(a, 90, atol=0.5)
    np.testing.assert_allclose(b.mean(axis=(0, 1)), (200, 10, 30), atol=0.5)


def test_bilinear_resize_of_a_gradient(tmp_path):
    # Horizontal ramp 0..255 over 64 px halved to 32: bilinear (no antialias) samples pixel pairs.
    ramp = np.tile(np.linspace(0, 252, 64).astype(np.uint8), (8, 1))
    path = tmp_path / "ramp.png"
    Image.fromarray(np.stack([ramp] * 3, -1)).save(path)
    out = read_resized(str(path), 32).numpy()[0, :, 0]
    want = (ramp[0, 0::2].astype(float) + ramp[0, 1::2]) / 2
    np.testing.assert_allclose(out, want, atol=0.51)


def test_empty_file_list():
    assert list(image_dataset([], 32, 4, "caffe")) == []
