"""Decoding every odd format to RGB, the store's byte policy, and clear reasons for broken files."""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imagegen import (image_bytes, write_animated_gif, write_exif_rotated_jpeg, write_image,
                      write_text_as_image, write_truncated_jpeg, write_zero_byte)
from tlpipe.runtime.errors import ImageDecodeError
from tlpipe.data.images import MAX_SIDE, normalise, normalise_bytes

def stored(source, max_side: int = MAX_SIDE) -> Image.Image:
    """The picture the image store keeps for a file (a path) or its bytes, decoded by Pillow."""
    data = source if isinstance(source, bytes) else open(source, "rb").read()
    im = Image.open(io.BytesIO(normalise_bytes(data, max_side=max_side).data))
    im.load()
    return im


ODD = [
    ("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"),
    ("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("1", "PNG"), ("I;16", "PNG"),
    ("P", "GIF"), ("L", "GIF"), ("RGB", "BMP"), ("L", "BMP"), ("P", "BMP"),
    ("RGB", "TIFF"), ("RGBA", "WEBP"),
]


@pytest.mark.parametrize("mode,fmt", ODD)
def test_odd_modes_decode_to_rgb_of_the_right_size(tmp_path, mode, fmt):
    path = write_image(tmp_path / f"x.{fmt.lower()}", mode=mode, size=(41, 23), fmt=fmt)
    im = stored(path)
    assert im.mode == "RGB" and im.size == (41, 23)
    data, ext, w, h = normalise(path)
    assert (w, h) == (41, 23)
    # A plain RGB JPEG is kept byte-for-byte; everything else becomes PNG.
    if (mode, fmt) == ("RGB", "JPEG"):
        assert ext == ".jpg" and data == path.read_bytes()
    else:
        assert ext == ".png" and Image.open(io.BytesIO(data)).format == "PNG"


def test_stored_bytes_decode_in_tensorflow(tmp_path):
    tf = pytest.importorskip("tensorflow")
    for i, (mode, fmt) in enumerate(ODD):
        path = write_image(tmp_path / f"{i}.{fmt.lower()}", mode=mode, size=(37, 29), fmt=fmt)
        data, ext, w, h = normalise(path)
        t = tf.io.decode_image(data, channels=3, expand_animations=False)
        assert tuple(t.shape) == (29, 37, 3), (mode, fmt)
        assert t.dtype == tf.uint8
        # TF sees the same pixels as our decoder (PNG exactly; JPEG up to IDCT rounding).
        ref = np.asarray(stored(path), dtype=np.int16)
        assert np.abs(t.numpy().astype(np.int16) - ref).max() <= (0 if ext == ".png" else 3)
    # A camera-style MPO (JPEG + appended picture) is kept as is; TF decodes its first picture.
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (200, 10, 10)).save(
        buf, "MPO", save_all=True, append_images=[Image.new("RGB", (30, 20), (10, 10, 200))])
    out = normalise_bytes(buf.getvalue())
    assert out.ext == ".jpg" and out.data == buf.getvalue()
    t = tf.io.decode_image(out.data, channels=3, expand_animations=False).numpy()
    assert t.shape == (20, 30, 3) and np.abs(t[5, 5].astype(int) - [200, 10, 10]).max() <= 3


def test_exif_orientation_is_applied(tmp_path):
    path = write_exif_rotated_jpeg(tmp_path / "rot.jpg", size=(60, 40), orientation=6)
    with Image.open(path) as raw:
        assert raw.size == (60, 40)
        raw_px = np.asarray(raw.convert("RGB"), dtype=np.int16)
    im = stored(path)
    assert im.size == (40, 60)
    # Orientation 6 means "rotate 90 degrees clockwise to display".
    expected = np.rot90(raw_px, k=-1)
    assert np.abs(np.asarray(im, dtype=np.int16) - expected).max() <= 2
    data, ext, w, h = normalise(path)
    assert ext == ".png" and (w, h) == (40, 60)  # rotated, so not copied byte-for-byte


def test_transparency_is_composited_on_white():
    buf = io.BytesIO()
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(buf, "PNG")
    assert np.asarray(stored(buf.getvalue())).min() == 255
    buf = io.BytesIO()
    Image.new("RGBA", (10, 10), (255, 0, 0, 255)).save(buf, "PNG")
    assert np.asarray(stored(buf.getvalue()))[0, 0].tolist() == [255, 0, 0]


def test_sixteen_bit_png_is_scaled_not_clipped():
    arr = np.full((8, 8), 65535 // 2, dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    px = np.asarray(stored(buf.getvalue()))
    assert px.shape == (8, 8, 3) and abs(int(px[0, 0, 0]) - 128) <= 1


def test_animated_gif_gives_its_first_frame(tmp_path):
    path = write_animated_gif(tmp_path / "a.gif", size=(30, 20))
    px = np.asarray(stored(path))
    assert px.shape == (20, 30, 3)
    assert px[5, 5].tolist() == [255, 0, 0]


def test_large_images_are_shrunk_to_max_side(tmp_path):
    png = write_image(tmp_path / "wide.png", size=(300, 120), fmt="PNG")
    assert stored(png, max_side=100).size == (100, 40)
    jpg = write_image(tmp_path / "wide.jpg", size=(800, 200), fmt="JPEG")
    data, ext, w, h = normalise(jpg, max_side=100)
    assert (ext, w, h) == (".png", 100, 25)
    assert Image.open(io.BytesIO(data)).size == (100, 25)


def test_huge_jpeg_decodes_with_reduction(tmp_path):
    # 12000x9000 (108 MP): Pillow's draft mode decodes it at 1/8 scale before the final resize.
    im = Image.new("RGB", (12000, 9000), (10, 200, 30))
    path = tmp_path / "huge.jpg"
    im.save(path, "JPEG", quality=50)
    del im
    out = stored(path)
    assert out.size == (2048, 1536)
    assert np.abs(np.asarray(out, dtype=int)[100, 100] - [10, 200, 30]).max() <= 6


def test_small_images_are_accepted():
    data, ext, w, h = normalise_bytes(image_bytes("RGB", (5, 3), "PNG"))
    assert (w, h) == (5, 3)


@pytest.mark.parametrize("writer,reason", [
    (write_zero_byte, "empty file"),
    (write_truncated_jpeg, "truncated or corrupt image"),
    (write_text_as_image, "not an image"),
])
def test_broken_files_raise_with_a_short_reason(tmp_path, writer, reason):
    path = writer(tmp_path / "bad.jpg")
    with pytest.raises(ImageDecodeError) as info:
        normalise(path)
    assert info.value.reason == reason
    assert str(path) in str(info.value)


def test_unreadable_file(tmp_path):
    path = write_image(tmp_path / "locked.png")
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reading")
        with pytest.raises(ImageDecodeError, match="permission denied"):
            normalise(path)
    finally:
        os.chmod(path, 0o644)


def test_png_encoding_is_deterministic(tmp_path):
    path = write_image(tmp_path / "p.png", mode="P", size=(50, 50))
    a, b = normalise(path), normalise(path)
    assert a == b and hashlib.sha256(a.data).digest() == hashlib.sha256(b.data).digest()


small_images = st.builds(
    lambda mode, fmt, w, h: (mode, fmt, w, h),
    st.sampled_from(["RGB", "L", "RGBA", "P", "1"]),
    st.sampled_from(["PNG", "GIF", "BMP", "JPEG", "TIFF", "WEBP"]),
    st.integers(1, 40), st.integers(1, 40),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=300), small_images.map(lambda a: a)), cut=st.integers(0, 400))
def test_decoder_decodes_or_raises_image_decode_error(data, cut):
    if isinstance(data, tuple):
        mode, fmt, w, h = data
        if fmt == "JPEG" and mode in ("RGBA", "P"):
            mode = "RGB"
        data = image_bytes(mode, (w, h), fmt)
        data = data[: len(data) - cut % len(data)] if cut % 3 == 0 else data  # sometimes truncated
    try:
        out = normalise_bytes(data)
    except ImageDecodeError as exc:
        assert exc.reason
        return
    im = Image.open(io.BytesIO(out.data))
    assert im.convert("RGB").size == (out.width, out.height)


def test_permission_error_reason_without_chmod(tmp_path, monkeypatch):
    # Root can read a chmod-000 file, so the mapping of PermissionError is checked directly too.
    path = write_image(tmp_path / "p.png")

    def deny(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_bytes", deny)
    with pytest.raises(ImageDecodeError) as info:
        normalise(path)
    assert info.value.reason == "unreadable: permission denied"
