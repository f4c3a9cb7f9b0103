"""Every bench script runs: each as a subprocess with its smallest arguments, on small generated images.

The README and docs quote figures printed by bench/*.py; a bench that no longer runs (a renamed module, a
param it no longer sets) would leave those figures unreproducible without anyone noticing. These runs
check only that each script finishes and prints what its figures are read from, at a size where the
numbers mean nothing: 32 px, random weights (`none`), a handful of images in the layout the benches read
(a folder with train/ and validation/ of class folders, as cats_and_dogs_filtered).

The benches that run DVC pipelines (grid, results, kill_resume; sharing up to `extract`) and the one that starts
Ray (scale) are marked slow, like the suite's other end-to-end runs (`pytest -m "not slow"` skips them).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagegen import make_class_folders

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
TINY = ["--weights", "none"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench_photos")
    make_class_folders(root / "train", {"cats": 12, "dogs": 12}, size=40, seed=0)
    make_class_folders(root / "validation", {"cats": 12, "dogs": 12}, size=40, seed=1)
    return root


def run_bench(script: str, *args, cwd: Path | None = None, timeout: int = 600) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"bench/{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_every_bench_script_has_a_smoke_test():
    here = Path(__file__).read_text()
    scripts = sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py")
    assert [s for s in scripts if f'"{s}"' not in here] == []


def test_speed(source):
    out = run_bench("speed.py", "--source", source, "--train-per-class", 4, "--val-per-class", 2, "--rounds", 1,
                    "--round-seconds", 0.05, "--max-chunk", 20, "--size", 32, *TINY)
    assert "train_head_aug: epoch of" in out and "finetune: epoch of" in out and "online/cached" in out


def test_augment(source):
    out = run_bench("augment.py", "--source", source, "--train-per-class", 4, "--val-per-class", 2,
                    "--test-per-class", 2, "--views", 1, "--epochs", 2, "--size", 32, *TINY)
    assert "train_head_aug s/epoch: cached" in out and "break-even" in out


def test_precision(source):
    out = run_bench("precision.py", "--source", source, "--train-per-class", 4, "--val-per-class", 2,
                    "--test-per-class", 2, "--size", 32, "--epochs", 1, "--rounds", 1, *TINY)
    assert "the speed of float32" in out


def test_extract(source):
    out = run_bench("extract.py", "--source", source, "--n", 8, "--image-size", 32, "--rounds", 1,
                    "--batch-size", 4, *TINY)
    assert "ratio disk/memory" in out


def test_probe_then_standardize(source, tmp_path):
    out = run_bench("probe.py", "--source", source, "--train", 4, "--val", 2, "--test", 2, "--size", 32,
                    "--rounds", 1, "--keep-features", tmp_path / "features", *TINY)
    assert "ratio auto / named" in out and "chosen:" in out
    out = run_bench("standardize.py", "--features", tmp_path / "features", "--lrs", "1e-3", "--epochs", 1)
    assert out.count("| 0.001 | 1 |") == 2  # standardize no and yes, one epoch each
    out = run_bench("head_lr.py", "--features", tmp_path / "features", "--lrs", "1e-4,1e-2", "--epochs", 1)
    assert "auto chooses" in out and out.count("| 1 | ") == 2  # two rates, one epoch each
    out = run_bench("variance_shrink.py", "--features", tmp_path / "features", "--shrinks", "0,0.1", "--lrs", "1e-3",
                    "--epochs", 1)
    assert out.count("auto keeps 0.001") == 2 and "(the pipeline's)" in out


def test_probe_c(source):
    out = run_bench("probe_c.py", "--source", source, "--train", 4, "--val", 2, "--size", 32, "--cs", "0.01,1", *TINY)
    assert "probe's choice at C=0.01" in out and "(the pipeline's C)" in out


def test_threads(source):
    out = run_bench("threads.py", "--source", source, "--n", 20, "--rounds", 1, "--steps", 1, "--batch", 4,
                    "--image-size", 32, *TINY)
    assert "fixed" in out


@pytest.mark.slow
def test_scale(source):
    out = run_bench("scale.py", "--source", source, "--n", 8, "--image-size", 32, "--batch-size", 4,
                    "--rows-per-shard", 4, "--cpus", 2, *TINY)
    assert "ray" in out


@pytest.mark.slow
def test_kill_resume(source):
    run_bench("kill_resume.py", "--source", source, "--per-class", 12, "--image-size", 32, "--batch-size", 4,
              *TINY)


@pytest.mark.slow
def test_sharing(source):
    out = run_bench("sharing.py", "--dataset", source, "--per-class", 6, "--image-size", 32, "--epochs", 1,
                    "--views", 1, "--repeats", 1, "--target", "extract", *TINY)
    assert "`dvc repro extract`" in out and "ratio to running from scratch" in out and "no-op DVC work" in out


@pytest.mark.slow
def test_results_and_grid(source, tmp_path):
    sets = ["-S", "backbone.image_size=32", "-S", "head.epochs=1",
            "-S", "head_aug.epochs=1", "-S", "finetune.epochs=1", "-S", "augment.views=1",
            "-S", "visualize.filter_steps=1", "-S", "visualize.filters=1"]
    out = run_bench("results.py", "--source", source / "train", "-S", "backbone.weights=none", *sets,
                    "--keep", tmp_path / "project")
    assert "finetuned" in out
    out = run_bench("grid.py", "train_head", "-S", "head.lr=1e-3,1e-4", cwd=tmp_path / "project")
    assert "head.lr" in out
    out = run_bench("finetune_warmup.py", "--steps", 0, 2, "--epochs", 1, "--lr", "1e-5", cwd=tmp_path / "project")
    assert "| 0 |" in out and "| 2 |" in out and "lr 1e-05" in out, out
    out = run_bench("head_aug_lr.py", "--epochs", "1,2", "--lrs", "1e-4,1e-3", cwd=tmp_path / "project")
    assert out.count("auto chooses") == 2, out
    out = run_bench("tta.py", "--models", "head", "finetuned", cwd=tmp_path / "project")
    assert "| head |" in out and "| finetuned |" in out, out
