"""Generate test images: class folders a tiny model can separate, and odd or broken files.

Import from any test (tests/ is on sys.path):
    from imagegen import make_class_folders, write_image, write_truncated_jpeg, ...

Each class gets its own colour and shape (by its position in `classes`, or by its name when it
is one of SHAPES); position, size, tint and noise vary per image, so no two images are identical.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "stripes", "triangle", "cross", "ring", "checker", "diagonal")
COLOURS = [(220, 40, 40), (40, 90, 220), (40, 170, 60), (230, 200, 30),
           (150, 60, 190), (30, 190, 200), (240, 130, 20), (90, 90, 90)]


def draw_class_image(index: int, size: int = 48, rng: np.random.Generator | None = None,
                     shape: str | None = None) -> Image.Image:
    """One RGB image of class `index`: a coloured shape on a light noisy background."""
    rng = rng or np.random.default_rng(index)
    shape = shape or SHAPES[index % len(SHAPES)]
    colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLOURS[index % len(COLOURS)])
    bg = rng.integers(200, 256, size=(size, size, 3), dtype=np.uint8)
    im = Image.fromarray(bg)
    d = ImageDraw.Draw(im)
    r = int(size * rng.uniform(0.25, 0.4))
    cx, cy = (int(rng.integers(r, size - r + 1)) for _ in range(2))
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "stripes":
        step = max(2, size // 8)
        for x in range(int(rng.integers(0, step)), size, 2 * step):
            d.rectangle([x, 0, x + step - 1, size], fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        w = max(2, r // 3)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
    elif shape == "ring":
        d.ellipse(box, outline=colour, width=max(2, r // 3))
    elif shape == "checker":
        step = max(2, size // 6)
        for y in range(0, size, step):
            for x in range((y // step % 2) * step, size, 2 * step):
                d.rectangle([x, y, x + step - 1, y + step - 1], fill=colour)
    else:  # diagonal
        for k in range(-size, size, max(4, size // 6)):
            d.line([(k, 0), (k + size, size)], fill=colour, width=max(2, size // 16))
    return im


def make_class_folders(root, classes: dict[str, int], size: int = 48, seed: int = 0,
                       fmt: str = "jpeg") -> dict[str, list[Path]]:
    """Write `classes[name]` images into root/name/; fmt "jpeg", "png" or "mixed" (alternating)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    written: dict[str, list[Path]] = {}
    for index, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        shape = name if name in SHAPES else None
        written[name] = []
        for i in range(count):
            im = draw_class_image(index, size, rng, shape)
            kind = fmt if fmt != "mixed" else ("jpeg", "png")[i % 2]
            ext = ".jpg" if kind == "jpeg" else ".png"
            path = folder / f"{name}.{i}{ext}"
            im.save(path, format="JPEG" if kind == "jpeg" else "PNG", quality=90)
            written[name].append(path)
    return written


def image_bytes(mode: str = "RGB", size: tuple[int, int] = (40, 30), fmt: str = "PNG",
                colour=None, **save_kw) -> bytes:
    """Bytes of a solid-ish image of the given Pillow mode and format (a gradient so it's not flat)."""
    w, h = size
    grad = (np.add.outer(np.arange(h), np.arange(w)) * 255 // max(1, w + h - 2)).astype(np.uint8)
    rgb = Image.fromarray(np.stack([grad, 255 - grad, np.full_like(grad, 128)], -1))
    if colour is not None:
        rgb = Image.new("RGB", size, colour)
    if mode == "I;16":
        im = Image.fromarray(grad.astype(np.uint16) * 257)
    elif mode == "CMYK":
        im = rgb.convert("CMYK")
    else:
        im = rgb.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save_kw)
    return buf.getvalue()


def write_image(path, mode: str = "RGB", size: tuple[int, int] = (40, 30), fmt: str = "PNG", **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(mode, size, fmt, **kw))
    return path


def write_exif_rotated_jpeg(path, size: tuple[int, int] = (60, 40), orientation: int = 6) -> Path:
    """A JPEG stored as size=(w, h) whose EXIF says to rotate it (6: 90 degrees clockwise)."""
    im = Image.open(io.BytesIO(image_bytes("RGB", size, "PNG")))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="JPEG", exif=exif.tobytes())
    return path


def write_animated_gif(path, size: tuple[int, int] = (30, 20), frames: int = 3) -> Path:
    ims = [Image.new("RGB", size, c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)][:frames]]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ims[0].save(path, format="GIF", save_all=True, append_images=ims[1:], duration=100, loop=0)
    return path


def write_zero_byte(path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_truncated_jpeg(path, size: tuple[int, int] = (64, 64)) -> Path:
    data = image_bytes("RGB", size, "JPEG", quality=95)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def write_text_as_image(path, text: str = "this is not a picture\n") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def zip_folder(folder, zip_path, prefix: str = "") -> Path:
    """Zip `folder`'s files under `prefix/` (e.g. the single top folder of a downloaded archive)."""
    folder, zip_path = Path(folder), Path(zip_path)
    with zipfile.ZipFile(zip_path, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, str(Path(prefix) / f.relative_to(folder)) if prefix else str(f.relative_to(folder)))
    return zip_path


def tar_folder(folder, tar_path, prefix: str = "") -> Path:
    folder, tar_path = Path(folder), Path(tar_path)
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(folder, arcname=prefix or ".")
    return tar_path


def textured_photo(size: tuple[int, int], seed: int) -> np.ndarray:
    """uint8 RGB [h, w, 3] with photo-like texture: gratings of random frequency and angle, a few soft
    blobs, and pixel noise. Real-size convolutions need such content: flat colours give mostly equal
    sums, whose order then makes no difference."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for _ in range(6):
        angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.02, 0.4), rng.uniform(0, 2 * np.pi)
        wave = np.sin(freq * (x * np.cos(angle) + y * np.sin(angle)) + phase)
        img += wave[..., None] * rng.uniform(10, 40, 3)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 40)
        img += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None] * rng.uniform(-80, 80, 3)
    img += rng.normal(0, 12, img.shape) + 128
    return np.clip(img, 0, 255).astype(np.uint8)


def make_textured_folders(root, classes: dict[str, int], seed: int = 0) -> Path:
    """root/<class>/<class>_<i>.jpg: textured JPEGs of a few real-photo sizes (150-220 px a side)."""
    from PIL import Image

    root = Path(root)
    sizes = [(150, 150), (200, 160), (170, 220)]
    for c, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = textured_photo(sizes[i % len(sizes)], seed * 10_000 + c * 1_000 + i)
            Image.fromarray(pixels, "RGB").save(root / name / f"{name}_{i}.jpg", quality=90)
    return root
