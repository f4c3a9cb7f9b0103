"""Feature files: contents, byte-identical reruns, resume after a crash or SIGKILL, disk full, damage."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from helpers import extract_split

from tlpipe.features import backbones

from tlpipe.features import shards
from tlpipe.runtime.errors import DataError, FeatureFileError
from tlpipe.features.extract import BaseSpec, Extractor
from tlpipe.features.featurefile import FORMAT, read_features

CLASSES = ["cat", "dog"]
SPEC = BaseSpec(name="vgg16", weights="none", layer="block4_pool", pooling="flatten", image_size=32)
BATCH, CHUNK = 4, 8  # 22 images: chunks of 8, 8 and 6 rows


def write_split(root, n=22, seed=0):
    """n random images in an image store plus their manifest, as the data stage writes them."""
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = i % 2
        name = f"{i:03d}{seed}.png" if i % 3 else f"{i:03d}{seed}.jpg"
        size = (int(rng.integers(30, 70)), int(rng.integers(30, 70)))
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images / name)
        rows.append({"path": f"{CLASSES[label]}/{i:03d}é.jpg", "class_name": CLASSES[label], "label": label,
                     "sha256": name.split(".")[0], "file": name})
    manifest = root / "train.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest, images


@pytest.fixture(scope="module")
def extractor():
    return Extractor(SPEC)


@pytest.fixture
def split(tmp_path):
    return write_split(tmp_path / "data")


@pytest.fixture
def clean(extractor, split, tmp_path):
    """The bytes of an uninterrupted run."""
    out = extract_split(*split, tmp_path / "clean" / "train.h5", SPEC, CLASSES, BATCH,
                        extractor=extractor, chunk_rows=CHUNK)
    return out.read_bytes()


def run(extractor, split, out):
    return extract_split(*split, out, SPEC, CLASSES, BATCH, extractor=extractor, chunk_rows=CHUNK)


def test_contents_match_the_model_and_manifest(extractor, split, tmp_path):
    manifest, images = split
    out = run(extractor, split, tmp_path / "f" / "train.h5")
    feats, labels, paths, attrs = read_features(out, expect={
        "backbone": "vgg16", "weights": "none", "layer": "block4_pool", "pooling": "flatten",
        "image_size": 32, "class_names": CLASSES})
    df = pd.read_csv(manifest)
    assert feats.shape == (22, 2 * 2 * 512) and feats.dtype == np.float32
    assert labels.tolist() == df["label"].tolist() and labels.dtype == np.int64
    assert paths == df["path"].tolist()  # non-ASCII paths survive as UTF-8
    assert attrs["preprocessing"] == "caffe" and attrs["weights_sha256"] is None
    assert attrs["tlpipe_format"] == FORMAT
    # Each row is the model's output for that row's image, computed here without tf.data.
    from tlpipe.features.inputs import read_resized

    for i in (0, 9, 21):
        x = backbones.preprocess(read_resized(str(images / df["file"][i]), 32)[None], "caffe")
        np.testing.assert_allclose(feats[i], extractor.model(x).numpy()[0], rtol=1e-4, atol=1e-4)
    assert not shards.work_dir(out).exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.h5", "train.shards"]
    # Rows 0-7, 8-15 and 16-21 in three shard files; train.h5 maps onto them.
    assert sorted(p.name for p in (out.parent / "train.shards").iterdir()) == [
        "000000.h5", "000001.h5", "000002.h5", "manifest.json"]
    with h5py.File(out) as f:
        assert f["features"].is_virtual


def test_rerun_is_byte_identical(extractor, split, clean, tmp_path):
    time.sleep(1.1)  # a stored timestamp would now differ
    out = run(extractor, split, tmp_path / "again" / "train.h5")
    assert out.read_bytes() == clean
    for shard in (tmp_path / "clean" / "train.shards").iterdir():
        assert (out.parent / "train.shards" / shard.name).read_bytes() == shard.read_bytes(), shard.name


def test_resume_after_failure_matches_clean_run(extractor, split, clean, tmp_path, monkeypatch):
    out = tmp_path / "r" / "train.h5"
    real_save, saved = shards.write_shard, []

    def fail_after_one(path, array):
        if saved:
            raise RuntimeError("injected crash")
        saved.append(path)
        real_save(path, array)

    monkeypatch.setattr(shards, "write_shard", fail_after_one)
    with pytest.raises(RuntimeError, match="injected"):
        run(extractor, split, out)
    assert not out.exists()
    work = shards.work_dir(out)
    assert sorted(p.name for p in work.glob("*.h5")) == ["000000.h5"]

    monkeypatch.setattr(shards, "write_shard", real_save)
    batches = []
    real_call = Extractor.__call__
    monkeypatch.setattr(Extractor, "__call__", lambda self, b: batches.append(len(b)) or real_call(self, b))
    run(extractor, split, out)
    assert sum(batches) == 22 - CHUNK  # only the rows after the finished chunk were computed
    assert out.read_bytes() == clean
    assert not work.exists()


def test_changed_inputs_discard_saved_progress(extractor, split, tmp_path, monkeypatch):
    manifest, images = split
    out = tmp_path / "c" / "train.h5"
    monkeypatch.setattr(shards, "write_shard", lambda p, a: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError):
        run(extractor, split, out)
    monkeypatch.undo()
    # Plant a shard that would be wrong for the new inputs: a new fingerprint must not reuse it.
    work = shards.work_dir(out)
    shards.write_shard(work / "000000.h5", np.zeros((CHUNK, 2048), np.float32))
    df = pd.read_csv(manifest)
    df.iloc[::-1].to_csv(manifest, index=False)  # same images, other order
    run(extractor, split, out)
    feats, *_ = read_features(out)
    assert np.abs(feats[:CHUNK]).sum() > 0
    ref = run(extractor, split, tmp_path / "c2" / "train.h5")
    assert out.read_bytes() == ref.read_bytes()


def test_sigkill_then_resume_matches_clean_run(split, clean, tmp_path):
    manifest, images = split
    out = tmp_path / "k" / "train.h5"
    script = textwrap.dedent(f"""
        import os, signal
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from helpers import extract_split
        from tlpipe.features import shards
        from tlpipe.features.extract import BaseSpec
        real, n = shards.write_shard, []
        def save_then_die(path, array):
            real(path, array); n.append(1)
            if len(n) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        shards.write_shard = save_then_die
        extract_split({str(manifest)!r}, {str(images)!r}, {str(out)!r}, {SPEC!r},
                      {CLASSES!r}, {BATCH}, chunk_rows={CHUNK})
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists()
    assert len(list(shards.work_dir(out).glob("*.h5"))) == 2
    extract_split(manifest, images, out, SPEC, CLASSES, BATCH, chunk_rows=CHUNK)  # a fresh model, too
    assert out.read_bytes() == clean


def test_disk_full_while_saving_chunks(extractor, split, tmp_path, monkeypatch):
    out = tmp_path / "d" / "train.h5"

    def full(path, array):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "write_shard", full)
    with pytest.raises(FeatureFileError) as err:
        run(extractor, split, out)
    assert str(out) in str(err.value) and "disk full" in str(err.value)
    assert not out.exists()


def test_disk_full_while_writing_the_table_leaves_no_file(extractor, split, clean, tmp_path, monkeypatch):
    out = tmp_path / "a" / "train.h5"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "create_virtual", full)
    with pytest.raises(FeatureFileError, match="disk full"):
        run(extractor, split, out)
    # No feature file, final or temp; the finished shards wait in their folder.
    assert sorted(p.name for p in out.parent.iterdir()) == [".train.h5.work", "train.shards"]
    monkeypatch.undo()
    written = []
    monkeypatch.setattr(shards, "write_shard", lambda p, a: written.append(p))
    assert run(extractor, split, out).read_bytes() == clean  # space freed: the rerun finishes
    assert written == []  # from the shards already there, after checking their hashes


def test_read_features_rejects_damaged_and_mismatched_files(extractor, split, clean, tmp_path):
    good = tmp_path / "clean" / "train.h5"

    with pytest.raises(FeatureFileError, match=r"not found.*dvc repro extract"):
        read_features(tmp_path / "missing.h5")

    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(clean[: len(clean) // 2])
    with pytest.raises(FeatureFileError) as err:
        read_features(truncated)
    assert "truncated.h5" in str(err.value) and "dvc repro extract" in str(err.value)

    partial = tmp_path / "partial.h5"
    with h5py.File(partial, "w") as f:
        f["features"] = np.zeros((2, 3), np.float32)
    with pytest.raises(FeatureFileError, match="labels, paths missing"):
        read_features(partial)

    for key, value, shown in [("layer", "block5_pool", "layer='block4_pool'"),
                              ("layer", None, "layer='block4_pool'"),  # None: the default, block5_pool
                              ("image_size", 150, "image_size=32"),
                              ("class_names", ["cat", "dog", "fox"], "class_names=['cat', 'dog']"),
                              ("weights", "hed-bsds500", "weights='none'")]:
        with pytest.raises(FeatureFileError) as err:
            read_features(good, expect={key: value})
        msg = str(err.value)
        assert "train.h5" in msg and shown in msg and "dvc repro extract" in msg
    assert read_features(good, expect={"pooling": "flatten", "backbone": "vgg16"})[0].shape == (22, 2048)
    # A virtual dataset reads a missing shard as zeros: read_features refuses instead.
    (tmp_path / "clean" / "train.shards" / "000001.h5").unlink()
    with pytest.raises(FeatureFileError, match=r"000001\.h5 is missing or damaged.*dvc repro extract"):
        read_features(good)


def test_manifest_problems_are_data_errors(extractor, split, tmp_path):
    manifest, images = split
    df = pd.read_csv(manifest)
    bad = df.copy()
    bad.loc[3, "label"] = 0  # row 3 is a dog
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="row 5 has label 0 for class 'dog'"):
        extract_split(tmp_path / "bad.csv", images, tmp_path / "o.h5", SPEC, CLASSES, BATCH, extractor=extractor)
    (images / df["file"][5]).unlink()
    with pytest.raises(DataError, match=f"{df['file'][5]}.*not found"):
        run(extractor, split, tmp_path / "o.h5")
    (images / df["file"][6]).write_bytes(b"not an image")
    df.drop(index=5).to_csv(manifest, index=False)
    with pytest.raises(DataError, match="cannot read an image"):
        run(extractor, split, tmp_path / "o.h5")
    assert not (tmp_path / "o.h5").exists()


def test_extract_stage_writes_three_files_the_cut_and_its_metrics(tmp_path, monkeypatch):
    data = tmp_path / "data"
    split_dir = data / "split"
    split_dir.mkdir(parents=True)
    for i, name in enumerate(("train", "validation", "test")):
        manifest, images = write_split(data, n=3 + i, seed=i)
        manifest.rename(split_dir / f"{name}.csv")
    (split_dir / "classes.json").write_text(json.dumps({"classes": CLASSES}))
    (tmp_path / "params.yaml").write_text(
        "backbone: {name: vgg16, weights: none, layer: block3_pool, pooling: avg, image_size: 32}\n"
        "compute: {precision: float32, batch_size: 2}\n")
    monkeypatch.chdir(tmp_path)
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "stages" / "extract.py"
    spec = importlib.util.spec_from_file_location("extract_stage_under_test", path)
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    stage.main(["--split-dir", str(split_dir), "--images", str(images), "--out", "features"])
    for i, name in enumerate(("train", "validation", "test")):
        feats, labels, _, attrs = read_features(tmp_path / "features" / f"{name}.h5",
                                                expect={"layer": "block3_pool", "pooling": "avg"})
        assert feats.shape == (3 + i, 256)
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == [
        "cut.json", "test.h5", "test.shards", "train.h5", "train.shards", "validation.h5", "validation.shards"]
    cut = json.loads((tmp_path / "features" / "cut.json").read_text())
    assert (cut["layer"], cut["pooling"], cut["chosen_by"]) == ("block3_pool", "avg", "params")
    assert [(r["layer"], r["pooling"], r["dim"]) for r in cut["probe"]] == [("block3_pool", "avg", 256)]
    metrics = json.loads((tmp_path / "metrics" / "extract.json").read_text())
    assert metrics == {"cut": {"layer": "block3_pool", "pooling": "avg",
                               "probe_val_accuracy": cut["probe"][0]["val_accuracy"]}}
