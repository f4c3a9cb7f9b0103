"""Bad input through the stage scripts, as a user runs them: one clear line, no traceback.

Each case writes a small project (params.yaml and whatever inputs the stage reads) in its own
folder and runs `python stages/<stage>.py` there. A deliberate error must give exit status 1,
an `error: ` line naming the file or key and what to do, and no Python traceback. Bad images
are not errors: they are listed in rejected.csv and counted, and the stage succeeds.

The library-level behaviour of each module is tested next to it (test_images, test_split,
test_config, test_backbones, test_features, ...); this file checks what reaches the user.
Every stage run starts a fresh Python (TensorFlow alone takes seconds to import), so the cases
run side by side in one module fixture and each test asserts on its own case's result.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from helpers import (FEATURES_PARAMS, TF_NOISE, feature_file, stage_cmd, tool_env, user_lines, write_cut,
                     write_params)
from imagegen import (image_bytes, make_class_folders, write_animated_gif, write_exif_rotated_jpeg, write_image,
                      write_text_as_image, write_truncated_jpeg, write_zero_byte)

WORKERS = 4  # stage processes at once: most of their time is importing, which overlaps well


# ---------------------------------------------------------------- helpers


def assert_clean_error(proc, *expected: str, first: bool = True) -> str:
    """Exit 1, no traceback, and an `error: ` line holding every `expected` text; returns the message.

    first: the error is the first thing the user sees (nothing ran yet); otherwise warnings printed
    while working may come first and the error is the last line.
    """
    err = proc.stderr
    assert proc.returncode == 1, f"exit {proc.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = user_lines(err)
    assert lines, "nothing on stderr"
    at = 0 if first else max(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert lines[at].startswith("error: "), err[-3000:]
    message = "\n".join(lines[at:])  # a message may continue on the next lines (config: one per key)
    for text in expected:
        assert text in message, f"{text!r} not in:\n{message}"
    if first and not TF_NOISE.search(err) and "\r" not in err:  # nothing ran: the very first bytes
        assert err.startswith("error: ")
    return message


def run_in(folder: Path, cmd: list[str], timeout: int = 420) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    # Bytes, decoded here: text mode would turn a progress bar's \r into a line break.
    proc = subprocess.run(cmd, cwd=folder, env=tool_env(), capture_output=True, timeout=timeout)
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    proc.seconds = time.monotonic() - t0
    return proc


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with the data of one row (no big buffer needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (1 + 3 * width)))
            + chunk(b"IEND", b""))


def small_split(project: Path, per_class: int = 8) -> None:
    """data/images + data/split of a tiny generated source, as the data stage writes them."""
    from tlpipe.data.split import build_dataset

    src = project / "src"
    make_class_folders(src, {"circle": per_class, "square": per_class}, size=32)
    build_dataset(src, project / "data" / "images", project / "data" / "split",
                  split={"train": 0.5, "validation": 0.25, "test": 0.25}, seed=0, min_per_split=1, workers=1)


# ---------------------------------------------------------------- the cases
# Each: a setup (project folder -> stage command) and the texts its error line must hold.


def config_case(stage: str, updates: dict):
    def setup(p: Path):
        write_params(p, updates)
        return stage_cmd(stage)
    return setup


def data_case(build_source, updates: dict | None = None):
    def setup(p: Path):
        src = build_source(p / "source")
        write_params(p, updates, source=src)
        return stage_cmd("data", "--images", "data/images", "--out", "data/split")
    return setup


def two_classes(src: Path, n: int = 8) -> Path:
    make_class_folders(src, {"cat": n, "dog": n}, size=32)
    return src


def one_class(src: Path) -> Path:
    make_class_folders(src, {"cat": 8}, size=32)
    return src


def wrapped_in_a_folder(src: Path) -> Path:
    make_class_folders(src / "animals", {"cat": 8, "dog": 8}, size=32)
    return src


def empty(src: Path) -> Path:
    src.mkdir(parents=True)
    (src / ".DS_Store").write_bytes(b"\0")  # hidden files do not count as content
    return src


def only_broken_in_one_class(src: Path) -> Path:
    make_class_folders(src, {"cat": 8}, size=32)
    write_zero_byte(src / "dog" / "a.jpg")
    write_text_as_image(src / "dog" / "b.jpg")
    return src


def a_plain_file(src: Path) -> Path:
    src.parent.mkdir(parents=True, exist_ok=True)
    (src.parent / "photos.jpg").write_bytes(image_bytes("RGB", (32, 32), "JPEG"))
    return src.parent / "photos.jpg"


def extract_case(updates: dict, before=None):
    def setup(p: Path):
        split = p / "data" / "split"
        split.mkdir(parents=True)
        (split / "classes.json").write_text('{"classes": ["cat", "dog"]}')
        if before:
            before(p)
        write_params(p, updates)
        return stage_cmd("extract", "--split-dir", "data/split", "--images", "data/images", "--out", "features")
    return setup


def text_weights(p: Path) -> None:
    (p / "mine.weights.h5").write_text("these are not weights\n")


def viewcache_bad_layer(p: Path):
    small_split(p)
    write_params(p, {"finetune": {"unfreeze_from": "block9_conv1"}})
    return stage_cmd("viewcache", "--split-dir", "data/split", "--images", "data/images", "--out", "features/views.h5")


def truncated_train_features(p: Path):
    good = feature_file(p / "features" / "train.h5", 8).read_bytes()
    (p / "features" / "train.h5").write_bytes(good[: len(good) // 2])
    feature_file(p / "features" / "validation.h5", 4, seed=1)
    write_params(p, FEATURES_PARAMS)
    return stage_cmd("train_head", "--features", "features", "--model", "models/head.keras",
                     "--metrics", "metrics/train_head.json", "--live", "dvclive/train_head")


def features_of_other_image_size(p: Path):
    # Made at 64 px while params.yaml says 32 (e.g. copied from another experiment by hand).
    feature_file(p / "features" / "train.h5", 8, image_size=64)
    feature_file(p / "features" / "validation.h5", 4, image_size=64, seed=1)
    write_params(p, FEATURES_PARAMS)
    return stage_cmd("train_head", "--features", "features", "--model", "models/head.keras",
                     "--metrics", "metrics/train_head.json", "--live", "dvclive/train_head")


VGG16_LAYERS = "block1_conv1, block1_conv2, block1_pool, block2_conv1"

CASES = {
    # --- params (no TensorFlow: params are checked before anything is imported)
    "mistyped key": (config_case("train_head", {"head": {"lr8": 1e-3}}),
                     ["params.yaml: invalid parameters", "head.lr8: unknown key", "Did you mean head.lr?"]),
    "mistyped section": (config_case("extract", {"backbon": {"name": "vgg16"}}),
                         ["backbon: unknown key", "Did you mean backbone?"]),
    "wrong type": (config_case("extract", {"backbone": {"image_size": "big"}}),
                   ["backbone.image_size: Input should be a valid integer"]),
    "negative lr": (config_case("train_head", {"head": {"lr": -1e-3}}),
                    ["head.lr: Input should be greater than 0"]),
    "fractions not adding up": (config_case("data", {"data": {"split": {"train": 0.5, "validation": 0.3, "test": 0.3}}}),
                                ["data.split: fractions must add up to 1 (they add up to 1.1)"]),
    "image size below vgg16 minimum": (config_case("extract", {"backbone": {"image_size": 16}}),
                                       ["backbone.image_size: Input should be greater than or equal to 32"]),
    "several bad keys at once": (config_case("finetune", {"finetune": {"from": "finetuned", "lr": 0}}),
                                 ["finetune.from: Input should be 'head_aug' or 'head'", "finetune.lr"]),
    # --- folders
    "empty source": (data_case(empty), ["data.source: folder", "is empty", "one subfolder of images per class"]),
    "single class": (data_case(one_class), ["found only class 'cat'", "at least 2 class folders"]),
    "class folders one level too deep": (data_case(wrapped_in_a_folder),
                                         ["found only class 'animals'", "at least 2 class folders"]),
    "a class of broken files only": (data_case(only_broken_in_one_class),
                                     ["only 1 class(es) with usable images; need at least 2"]),
    "too few images for the split counts": (
        data_case(two_classes, {"data": {"split": {"train": 6, "validation": 2, "test": 2}}}),
        ["data.split asks for 6 train + 2 validation + 2 test = 10 images of class 'cat', which has only 8",
         "lower the counts or use fractions"]),
    "too few images for min_per_split": (
        data_case(lambda s: two_classes(s, 4), {"data": {"min_per_split": 2}}),
        ["class 'cat' has 2 train, 1 validation, 1 test images", "min_per_split=2"]),
    "source is a plain file": (data_case(a_plain_file), ["photos.jpg: not a .zip or .tar(.gz) archive"]),
    # --- backbone and weights (these import TensorFlow first)
    "unknown backbone.layer": (extract_case({"backbone": {"layer": "block9_pool"}}),
                               ["backbone.layer: vgg16 has no layer 'block9_pool'; choose one of: " + VGG16_LAYERS,
                                "block5_pool"]),
    "weights file missing": (extract_case({"backbone": {"weights": "nowhere/mine.weights.h5"}}),
                             ["backbone.weights: 'nowhere/mine.weights.h5' is neither imagenet, hed-bsds500 nor none",
                              "give the path of a .weights.h5 file"]),
    "weights file not HDF5": (extract_case({"backbone": {"weights": "mine.weights.h5"}}, before=text_weights),
                              ["mine.weights.h5: not an HDF5 weights file", "saved from the same architecture"]),
    "unknown finetune.unfreeze_from": (viewcache_bad_layer,
                                       ["finetune.unfreeze_from: vgg16 has no layer 'block9_conv1'; choose one of: "
                                        + VGG16_LAYERS, "block5_conv1"]),
    "truncated feature file": (truncated_train_features,
                               ["train.h5: damaged or not a feature file", "rerun the extract stage"]),
    "feature file of another image size": (features_of_other_image_size,
                                           ["features/train.h5: made with image_size=64 but params.yaml has backbone.image_size=32",
                                            "rerun the extract stage (`dvc repro extract`)"]),
}
TF_CASES = [k for k in CASES if list(CASES).index(k) >= list(CASES).index("unknown backbone.layer")]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case's project set up, then all stage runs side by side: {case: CompletedProcess}."""
    root = tmp_path_factory.mktemp("stage_errors")
    commands = {}
    for i, (name, (setup, _)) in enumerate(CASES.items()):
        folder = root / f"case{i:02d}"
        folder.mkdir()
        commands[name] = (folder, setup(folder))
    # Slowest (TensorFlow) first so they overlap with the quick ones.
    order = TF_CASES + [k for k in CASES if k not in TF_CASES]
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {name: pool.submit(run_in, *commands[name]) for name in order}
        done = {name: fut.result() for name, fut in futures.items()}
    if os.environ.get("TLPIPE_TEST_TIMES"):
        print({name: round(p.seconds, 1) for name, p in done.items()})
    return done


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_stops_the_stage_with_a_clear_error(results, case):
    first = case not in ("a class of broken files only",)  # that one warns about each class first
    assert_clean_error(results[case], *CASES[case][1], first=first)


def test_a_class_of_broken_files_is_named_in_the_warnings(results):
    lines = user_lines(results["a class of broken files only"].stderr)
    assert "warning: class 'dog' has no usable images (all rejected); ignoring that class." in lines


# ---------------------------------------------------------------- bad images: listed, counted, not fatal


def odd_source(src: Path) -> dict:
    """Two classes of good images plus one of every odd or broken file; returns the expected rejections."""
    make_class_folders(src, {"cat": 10, "dog": 10}, size=40)
    c, d = src / "cat", src / "dog"
    write_zero_byte(c / "zero.jpg")
    write_truncated_jpeg(c / "cut.jpg")
    write_text_as_image(d / "notes.jpg")
    (d / "panorama.png").write_bytes(png_header_only(15000, 13000))  # 195 MP: over our limit
    (c / "bomb.png").write_bytes(png_header_only(20000, 20000))  # 400 MP: a decompression bomb
    write_image(c / "alpha.png", mode="RGBA", size=(40, 40))
    write_image(c / "sixteen bit.png", mode="I;16", size=(40, 40))
    write_image(d / "palette.gif", mode="P", size=(40, 40), fmt="GIF")
    write_animated_gif(d / "animated.gif", size=(40, 40))
    write_image(c / "cmyk.jpg", mode="CMYK", size=(40, 40), fmt="JPEG")
    write_image(d / "grey.jpg", mode="L", size=(40, 40), fmt="JPEG")
    write_exif_rotated_jpeg(d / "rotated.jpg", size=(60, 40))
    write_image(c / "tiny.png", size=(8, 6))
    write_image(d / "Ünïcödé naïve 猫.png", size=(40, 40), colour=(9, 9, 200))
    (src / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (c / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (c / "._cat.0.jpg").write_bytes(b"\0\5\26\7apple double")
    write_image(src / ".hidden" / "h.png", colour=(1, 2, 3))
    outside = src.parent / "elsewhere"
    write_image(outside / "linked.png", size=(40, 40), colour=(200, 9, 9))
    write_image(outside / "more" / "linked2.png", size=(40, 40), colour=(201, 9, 9))
    os.symlink(outside / "linked.png", c / "link.png")
    os.symlink(outside / "more", c / "linked folder")
    locked = write_image(d / "locked.png", size=(40, 40), colour=(3, 200, 3))
    os.chmod(locked, 0)
    expected = {"cat/zero.jpg": "empty file", "cat/cut.jpg": "truncated or corrupt image",
                "dog/notes.jpg": "not an image",
                "dog/panorama.png": "too large (15000x13000 pixels, limit 180,000,000)",
                "cat/bomb.png": "too large (over 360,000,000 pixels)"}
    if not os.access(locked, os.R_OK):  # root reads it anyway
        expected["dog/locked.png"] = "unreadable: permission denied"
    return expected


def test_odd_and_broken_images_are_listed_and_counted(tmp_path):
    import csv

    from tlpipe.data.manifests import read_manifest

    expected = odd_source(tmp_path / "source")
    write_params(tmp_path, source=tmp_path / "source")
    try:
        proc = run_in(tmp_path, stage_cmd("data", "--images", "data/images", "--out", "data/split"))
    finally:
        os.chmod(tmp_path / "source" / "dog" / "locked.png", 0o644)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    with open(tmp_path / "data/split/rejected.csv", newline="", encoding="utf-8") as f:
        rejected = {row["path"]: row["reason"] for row in csv.DictReader(f)}
    assert rejected == expected
    lines = user_lines(proc.stderr)
    assert f"warning: {len(expected)} files rejected" in "\n".join(lines)
    assert lines[-1].startswith("note: data: 2 classes") and f"; {len(expected)} rejected ->" in lines[-1]
    summary = json.loads((tmp_path / "data/split/summary.json").read_text())
    assert summary["rejected"] == len(expected) and summary["small_images"] == 1
    listed = {p for s in ("train", "validation", "test") for p in read_manifest(tmp_path / f"data/split/{s}.csv")["path"]}
    for odd in ("cat/alpha.png", "cat/sixteen bit.png", "dog/palette.gif", "dog/animated.gif", "cat/cmyk.jpg",
                "dog/grey.jpg", "dog/rotated.jpg", "cat/tiny.png", "dog/Ünïcödé naïve 猫.png", "cat/link.png",
                "cat/linked folder/linked2.png"):
        assert odd in listed, odd
    assert not [p for p in listed if "/." in p or p.startswith(".") or "Thumbs" in p]
    assert len(listed) == 20 + 11 + (0 if "dog/locked.png" in expected else 1)
    # Every stored image decodes as RGB in TensorFlow's terms (PIL here): 8-bit, 3 channels.
    for f in (tmp_path / "data/images").iterdir():
        with Image.open(f) as im:
            assert im.mode == "RGB", f.name


PEAK_MEMORY = r"""
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:  # VmHWM: this process's peak resident memory since exec (ru_maxrss would count the parent's)
    peak = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
    open("peak_kb.txt", "w").write(peak)
"""


def test_a_12000x9000_photo_is_decoded_in_bounded_memory(tmp_path):
    """The data stage on a 108-megapixel JPEG: decoded whole it would need 324 MB for its pixels alone."""
    src = two_classes(tmp_path / "source")
    big = Image.new("RGB", (12000, 9000), (30, 120, 200))
    big.save(src / "cat" / "huge.jpg", "JPEG", quality=60)
    del big
    write_params(tmp_path, source=src)
    cmd = stage_cmd("data", "--images", "data/images", "--out", "data/split")
    proc = run_in(tmp_path, [cmd[0], "-c", PEAK_MEMORY, *cmd[1:]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_mb = int((tmp_path / "peak_kb.txt").read_text()) / 1024
    assert peak_mb < 250, f"peak memory {peak_mb:.0f} MB"  # ~45 MB without the photo, ~115 MB with it
    sizes = {Image.open(f).size for f in (tmp_path / "data/images").iterdir()}
    assert (2048, 1536) in sizes  # shrunk to the store's 2048 px limit


def test_only_our_error_line_reaches_the_user(tmp_path):
    """TensorFlow's C++ start-up lines (absl's "All log messages before absl::InitializeLog()",
    oneDNN, cudart_stub, "failed call to cuInit") ignore TF_CPP_MIN_LOG_LEVEL and look like failures.
    The viewcache stage imports TensorFlow before it finds its input missing; a user who set nothing
    sees our one line and nothing else."""
    write_params(tmp_path)
    write_cut(tmp_path / "features", "block5_pool", "flatten")  # so the stage gets as far as TensorFlow
    env = {k: v for k, v in tool_env().items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TLPIPE_VERBOSE")}
    proc = subprocess.run(stage_cmd("viewcache"), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=420)
    assert proc.returncode == 1
    assert proc.stderr == "error: data/split/classes.json: not found; run the data stage first (`dvc repro data`).\n"
