"""The data stage's scan, split and outputs, on generated images."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imagegen import (image_bytes, make_class_folders, write_image, write_text_as_image,
                      write_truncated_jpeg, write_zero_byte)
from tlpipe.runtime.errors import ConfigError, DataError
from tlpipe.data.manifests import SPLITS, read_class_names, read_manifest
from tlpipe.data.split import Record, assign_splits, build_dataset, scan_source, split_sizes

FRACTIONS = {"train": 0.5, "validation": 0.25, "test": 0.25}
REPO = Path(__file__).resolve().parents[1]


def build(src, tmp_path, split=FRACTIONS, seed=42, min_per_split=1, tag="run", workers=None):
    images, out = tmp_path / tag / "images", tmp_path / tag / "split"
    summary = build_dataset(src, images, out, split=split, seed=seed, min_per_split=min_per_split,
                            workers=workers)
    return summary, images, out


def manifests(out) -> dict:
    return {s: read_manifest(out / f"{s}.csv") for s in SPLITS}


def rejected(out) -> dict:
    import csv
    with open(out / "rejected.csv", newline="", encoding="utf-8") as f:
        return {row["path"]: row["reason"] for row in csv.DictReader(f)}


def tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def recs(n_per_class: dict, dup_groups: int = 0) -> list[Record]:
    out = []
    for c, n in n_per_class.items():
        for i in range(n):
            sha = hashlib.sha256(f"{c}{i // 2 if i < 2 * dup_groups else i + 1000}".encode()).hexdigest()
            out.append(Record(f"{c}/{i}.jpg", c, None, sha, sha + ".jpg", 40, 40))
    return out


# ------------------------------------------------------------------ pure splitting


def test_fraction_sizes_use_largest_remainder():
    assert split_sizes(1500, FRACTIONS) == {"train": 750, "validation": 375, "test": 375}
    assert split_sizes(10, FRACTIONS) == {"train": 5, "validation": 3, "test": 2}
    thirds = {"train": 1 / 3, "validation": 1 / 3, "test": 1 / 3}
    assert split_sizes(7, thirds) == {"train": 3, "validation": 2, "test": 2}
    for n in range(0, 60):
        sizes = split_sizes(n, {"train": 0.7, "validation": 0.2, "test": 0.1})
        assert sum(sizes.values()) == n
        assert all(abs(sizes[s] - n * f) < 1 for s, f in {"train": 0.7, "validation": 0.2, "test": 0.1}.items())


def test_count_sizes_and_too_many():
    assert split_sizes(10, {"train": 4, "validation": 2, "test": 1}) == {"train": 4, "validation": 2, "test": 1}
    with pytest.raises(DataError, match=r"class 'dogs', which has only 5") as info:
        split_sizes(5, {"train": 4, "validation": 2, "test": 1}, "dogs")
    assert "= 7" in str(info.value)


@pytest.mark.parametrize("bad", [
    {"train": 0.5, "validation": 0.3, "test": 0.3},
    {"train": 0.5, "validation": 0.5},
    {"train": 0.5, "validation": "x", "test": 0.5},
    {"train": -1, "validation": 2, "test": 1},
    {"train": 0, "validation": 2, "test": 1},  # positive counts, as params.yaml is checked
    {"train": 1.0, "validation": 0.0, "test": 0.0},
])
def test_bad_split_params(bad):
    with pytest.raises(ConfigError, match="data.split"):
        split_sizes(10, bad)


def test_assignment_is_stratified_and_seeded():
    records = recs({"a": 40, "b": 20})
    one = assign_splits(records, FRACTIONS, seed=1)
    assert one == assign_splits(list(reversed(records)), FRACTIONS, seed=1)  # input order irrelevant
    other = assign_splits(records, FRACTIONS, seed=2)
    assert one != other
    for a in (one, other):
        for cls, n in (("a", 40), ("b", 20)):
            got = {s: sum(1 for p, sp in a.items() if sp == s and p.startswith(cls + "/")) for s in SPLITS}
            assert got == split_sizes(n, FRACTIONS)


def test_duplicates_never_straddle_splits():
    records = recs({"a": 30, "b": 30}, dup_groups=10)  # 10 pairs of byte-identical images per class
    for seed in range(15):
        a = assign_splits(records, FRACTIONS, seed)
        by_sha = {}
        for r in records:
            by_sha.setdefault(r.sha256, set()).add(a[r.path])
        assert all(len(s) == 1 for s in by_sha.values())


def test_counts_leave_the_rest_unused():
    a = assign_splits(recs({"a": 10, "b": 12}), {"train": 3, "validation": 2, "test": 1}, seed=0)
    assert len(a) == 12
    assert sorted(a.values()).count("train") == 6


# ------------------------------------------------------------------ the whole stage on files


@pytest.fixture
def src(tmp_path):
    root = tmp_path / "src"
    make_class_folders(root, {"red": 12, "blue": 12}, size=32, fmt="mixed")
    return root


def test_outputs_formats_and_counts(src, tmp_path):
    summary, images, out = build(src, tmp_path)
    m = manifests(out)
    assert read_class_names(out / "classes.json") == ["blue", "red"]
    for s, n in (("train", 6), ("validation", 3), ("test", 3)):
        df = m[s]
        assert list(df.columns) == ["path", "class_name", "label", "sha256", "file"]
        assert df["path"].tolist() == sorted(df["path"])
        assert (df.groupby("class_name").size() == n).all()
        assert (df["label"] == df["class_name"].map({"blue": 0, "red": 1})).all()
        for row in df.itertuples():
            stored = images / row.file
            assert stored.is_file() and row.file.startswith(row.sha256)
            assert hashlib.sha256((src / row.path).read_bytes()).hexdigest() == row.sha256
            if row.file.endswith(".jpg"):  # plain JPEGs are kept byte-for-byte
                assert stored.read_bytes() == (src / row.path).read_bytes()
    assert sorted(os.listdir(images)) == sorted(pd_concat_files(m))
    assert summary["counts"]["train"] == {"blue": 6, "red": 6}
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "rejected.csv").read_text() == "path,reason\n"


def pd_concat_files(m):
    return sorted({f for df in m.values() for f in df["file"]})


def test_rerun_and_listing_order_give_byte_identical_outputs(src, tmp_path):
    _, images1, out1 = build(src, tmp_path, tag="a")
    digests = tree_digest(images1), tree_digest(out1)
    _, images2, out2 = build(src, tmp_path, tag="a", workers=1)  # rerun over existing outputs
    assert (tree_digest(images2), tree_digest(out2)) == digests
    # A copy whose files were created in another order (so directory listings differ).
    copy = tmp_path / "copy"
    files = [p for p in src.rglob("*") if p.is_file()]
    random.Random(3).shuffle(files)
    for p in files:
        (copy / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, copy / p.relative_to(src))
    _, images3, out3 = build(copy, tmp_path, tag="b")
    assert tree_digest(out1) == tree_digest(out3) and tree_digest(images1) == tree_digest(images3)
    _, _, out4 = build(src, tmp_path, seed=7, tag="c")
    assert (out4 / "train.csv").read_bytes() != (out1 / "train.csv").read_bytes()


def test_bad_files_are_rejected_with_reasons(src, tmp_path, capsys):
    write_zero_byte(src / "red" / "zero.jpg")
    write_truncated_jpeg(src / "red" / "cut.jpg")
    write_text_as_image(src / "blue" / "notes.jpg")
    write_text_as_image(src / "blue" / "readme.txt")
    locked = write_image(src / "blue" / "locked.png")
    os.chmod(locked, 0)
    readable = os.access(locked, os.R_OK)  # root reads it anyway
    try:
        _, _, out = build(src, tmp_path)
    finally:
        os.chmod(locked, 0o644)
    rej = rejected(out)
    assert rej["red/zero.jpg"] == "empty file"
    assert rej["red/cut.jpg"] == "truncated or corrupt image"
    assert rej["blue/notes.jpg"] == "not an image"
    assert rej["blue/readme.txt"] == "not an image"
    if readable:  # running as root: the permission case is covered where tests run unprivileged
        assert "blue/locked.png" not in rej
    else:
        assert rej["blue/locked.png"] == "unreadable: permission denied"
    err = capsys.readouterr().err
    assert f"{len(rej)} files rejected" in err
    listed = {p for df in manifests(out).values() for p in df["path"]}
    assert not listed & set(rej)


def test_hidden_files_nested_odd_names_and_symlinks(src, tmp_path):
    (src / ".DS_Store").write_bytes(b"\0junk")
    (src / "red" / "._red.0.jpg").write_bytes(b"\0\0apple double")
    (src / "red" / "Thumbs.db").write_bytes(b"junk")
    (src / "blue" / "desktop.ini").write_text("[x]")
    hidden_dir = src / "red" / ".cache"
    write_image(hidden_dir / "h.png", colour=(1, 2, 3))
    write_image(src / ".git" / "x.png", colour=(1, 2, 4))
    write_image(src / "red" / "deep" / "er" / "nested ü é.png", colour=(200, 10, 10))
    write_image(src / "blue" / "with space.png", colour=(10, 10, 200))
    outside = tmp_path / "outside"
    write_image(outside / "linked.png", colour=(9, 9, 250))
    write_image(outside / "more" / "linked2.png", colour=(9, 9, 251))
    os.symlink(outside / "linked.png", src / "blue" / "link.png")
    os.symlink(outside / "more", src / "blue" / "linkdir")
    os.symlink(src, src / "red" / "loop")  # back to the root: must not loop or mix classes
    os.symlink(tmp_path / "gone.png", src / "red" / "dangling.png")
    summary, _, out = build(src, tmp_path)
    paths = {p: df for df in manifests(out).values() for p in df["path"]}
    rows = {p: df.loc[df["path"] == p].iloc[0] for p, df in paths.items()}
    assert rows["red/deep/er/nested ü é.png"].class_name == "red"
    assert rows["blue/with space.png"].class_name == "blue"
    assert rows["blue/link.png"].class_name == "blue"
    assert rows["blue/linkdir/linked2.png"].class_name == "blue"
    assert not [p for p in rows if "/." in p or p.startswith(".") or "Thumbs" in p or "desktop" in p]
    rej = rejected(out)
    assert rej == {"red/dangling.png": "broken symlink"}
    assert summary["images"] == 24 + 4


def test_empty_class_warns_and_single_class_errors(src, tmp_path, capsys):
    (src / "green").mkdir()
    (src / "green" / ".DS_Store").write_bytes(b"x")
    summary, _, _ = build(src, tmp_path)
    assert summary["classes"] == ["blue", "red"]
    assert "green/ in" in capsys.readouterr().err
    shutil.rmtree(src / "blue")
    with pytest.raises(DataError, match=r"only class 'red'.*at least 2"):
        build(src, tmp_path, tag="b")


def test_same_image_in_two_classes_is_label_noise(src, tmp_path, capsys):
    shutil.copy(src / "red" / "red.0.jpg", src / "blue" / "copy.jpg")
    shutil.copy(src / "red" / "red.0.jpg", src / "red" / "again.jpg")  # same class: a kept duplicate
    summary, images, out = build(src, tmp_path)
    rej = rejected(out)
    assert rej["blue/copy.jpg"] == "same image also in class red (label noise)"
    assert rej["red/red.0.jpg"] == rej["red/again.jpg"] == "same image also in class blue (label noise)"
    assert "label noise" in capsys.readouterr().err
    sha = hashlib.sha256((src / "blue" / "copy.jpg").read_bytes()).hexdigest()
    assert not list(images.glob(sha + ".*"))


def test_within_class_duplicates_share_a_split(src, tmp_path):
    for i in range(6):
        shutil.copy(src / "red" / f"red.{i}.jpg" if i % 2 == 0 else src / "red" / f"red.{i}.png",
                    src / "red" / f"dup{i}{'.jpg' if i % 2 == 0 else '.png'}")
    summary, images, out = build(src, tmp_path)
    where = {}
    for s, df in manifests(out).items():
        for sha in df["sha256"]:
            where.setdefault(sha, set()).add(s)
    assert all(len(v) == 1 for v in where.values())
    assert summary["duplicate_images"] == 6
    assert len(os.listdir(images)) == summary["images"] - 6


def test_presplit_layout_used_as_given(tmp_path):
    root = tmp_path / "pre"
    sizes = {"train": 5, "validation": 3, "test": 2}
    for s, n in sizes.items():
        make_class_folders(root / s, {"cat": n, "dog": n}, size=32, seed=len(s))
    summary, _, out = build(root, tmp_path, split={"train": 0.34, "validation": 0.33, "test": 0.33})
    assert summary["layout"] == "presplit"
    for s, df in manifests(out).items():
        assert len(df) == 2 * sizes[s]
        assert all(p.startswith(f"{s}/") for p in df["path"])


def test_partial_presplit_is_pooled_and_split(tmp_path, capsys):
    root = tmp_path / "pre"
    make_class_folders(root / "train", {"cat": 6, "dog": 6}, size=32, seed=1)
    make_class_folders(root / "validation", {"cat": 2, "dog": 2}, size=32, seed=2)
    summary, _, out = build(root, tmp_path)
    assert summary["layout"] == "pooled"
    assert summary["totals"] == {"train": 8, "validation": 4, "test": 4}
    assert "pooling them per class" in capsys.readouterr().err


def test_mixed_layout_is_an_error(src, tmp_path):
    make_class_folders(src / "train", {"x": 1, "y": 1}, size=32)
    with pytest.raises(DataError, match=r"mixes split folders \(train\)"):
        scan_source(src)


def test_min_per_split_and_counts_errors(src, tmp_path):
    with pytest.raises(DataError, match=r"class 'blue' has 6 train, 3 validation, 3 test images.*min_per_split=4"):
        build(src, tmp_path, min_per_split=4)
    with pytest.raises(DataError, match=r"class 'blue', which has only 12"):
        build(src, tmp_path, split={"train": 10, "validation": 2, "test": 2})
    assert not (tmp_path / "run" / "images").exists()  # a failed run leaves no store behind
    assert not [p for p in (tmp_path / "run").iterdir()]  # nor temp folders


def test_counts_split_drops_unused_from_store(src, tmp_path):
    summary, images, out = build(src, tmp_path, split={"train": 4, "validation": 2, "test": 2})
    assert summary["totals"] == {"train": 8, "validation": 4, "test": 4}
    assert summary["unused"] == 8
    assert len(os.listdir(images)) == 16


def test_small_images_are_counted(src, tmp_path, capsys):
    (src / "red" / "tiny.png").write_bytes(image_bytes("RGB", (8, 20), "PNG", colour=(255, 0, 0)))
    summary, _, _ = build(src, tmp_path)
    assert summary["small_images"] == 1
    assert "smaller than 32 px" in capsys.readouterr().err


def test_readers_reject_damaged_files(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\nx,1\n")
    with pytest.raises(DataError, match="m.csv: expected columns"):
        read_manifest(tmp_path / "m.csv")
    with pytest.raises(DataError, match="run the data stage"):
        read_manifest(tmp_path / "none.csv")
    (tmp_path / "c.json").write_text('{"classes": "cats"}')
    with pytest.raises(DataError, match="c.json"):
        read_class_names(tmp_path / "c.json")


def test_stage_script(src, tmp_path):
    work = tmp_path / "proj"
    work.mkdir()
    params = (REPO / "params.yaml").read_text().replace(
        "source: https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip", f"source: '{src}'")
    (work / "params.yaml").write_text(params)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [sys.executable, str(REPO / "stages" / "data.py"), "--images", "data/images", "--out", "data/split"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(read_manifest(work / "data/split/train.csv")) == 12
    (work / "params.yaml").write_text(params.replace(f"source: '{src}'", f"source: '{tmp_path}/missing'"))
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: data.source: folder") and "Traceback" not in proc.stderr


def test_leftovers_of_a_killed_run_are_removed(src, tmp_path):
    stale = tmp_path / "run" / ".images.tmp-dead"
    stale.mkdir(parents=True)
    (stale / "half.png").write_bytes(b"x")
    build(src, tmp_path)
    assert not stale.exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["images", "split"]
