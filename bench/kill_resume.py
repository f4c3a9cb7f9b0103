"""Benchmark: SIGKILL the extract stage mid-split on real photos, rerun it, compare with a clean run.

On a subset of the cats-and-dogs photos (../shared, read-only; nothing is downloaded):
  1. prepare a project (params.yaml pointing at a folder of symlinks to the subset), run the data stage;
  2. clean:  `python stages/extract.py` uninterrupted, timed;
  3. killed: the same in a copy of the project, SIGKILLed after --kill-after seconds (default: 0.2 s
     after the first finished chunk of train appears, so the kill lands mid-split);
  4. resume: the stage run again in the copy, timed;
and prints what the kill left behind, the timings and the verdict: the three feature files of the
resumed run byte-identical to the clean run's (exit 0) or not (exit 1).

    python bench/kill_resume.py --per-class 300 --image-size 150 --weights hed-bsds500
    python bench/kill_resume.py --per-class 140 --image-size 64 --weights none --kill-after 20
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tlpipe.data.manifests import SPLITS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "datasets" / "cats_and_dogs_filtered"


def env() -> dict:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def make_subset(source: Path, dst: Path, per_class: int) -> list[str]:
    """dst/<class>/ of symlinks to the first `per_class` photos (sorted) of each class, all splits pooled."""
    classes = sorted({p.name for p in source.glob("*/*") if p.is_dir()} or {p.name for p in source.iterdir() if p.is_dir()})
    for cls in classes:
        photos = sorted(p for p in source.rglob(f"{cls}/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if len(photos) < per_class:
            sys.exit(f"error: {source} has only {len(photos)} photos of class {cls!r}; lower --per-class")
        (dst / cls).mkdir(parents=True)
        for p in photos[:per_class]:
            (dst / cls / p.name).symlink_to(p)
    return classes


def write_params(project: Path, source: Path, args) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = str(source)
    params["backbone"].update(weights=args.weights, image_size=args.image_size)
    params["compute"]["batch_size"] = args.batch_size
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stage(name: str, *argv: str) -> list[str]:
    return [sys.executable, str(REPO / "stages" / f"{name}.py"), *argv]


EXTRACT = stage("extract", "--split-dir", "data/split", "--images", "data/images", "--out", "features")


def run(project: Path, cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=project, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[1:2])} failed in {project} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def kill_extract(project: Path, kill_after: float | None) -> tuple[float, str]:
    """Start extract, SIGKILL it; returns (seconds it ran, what it was doing)."""
    from tlpipe.features.shards import shard_name, work_dir

    # The library's own names, so the bench follows the shard format wherever it goes.
    first_chunk = work_dir(project / "features" / "train.h5") / shard_name(0)
    t0 = time.perf_counter()
    proc = subprocess.Popen(EXTRACT, cwd=project, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    when = "timer"
    while proc.poll() is None:
        ran = time.perf_counter() - t0
        if kill_after is not None and ran >= kill_after:
            break
        if kill_after is None and first_chunk.exists():
            time.sleep(0.2)  # a little into the next chunk, still inside train
            when = "0.2 s after train's first chunk"
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        sys.exit(f"error: extract finished (exit {proc.returncode}) before it could be killed; "
                 "use a smaller --kill-after or more --per-class photos")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return time.perf_counter() - t0, when


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the cats-and-dogs folder (read-only)")
    ap.add_argument("--per-class", type=int, default=300, help="photos per class (train gets half)")
    ap.add_argument("--image-size", type=int, default=150)
    ap.add_argument("--weights", default="hed-bsds500", help="hed-bsds500 (offline VGG16), none, imagenet, a file")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--kill-after", type=float, default=None,
                    help="seconds before SIGKILL (default: 0.2 s after train's first finished chunk)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary projects and print where")
    args = ap.parse_args(argv)
    if not args.source.is_dir():
        print(f"skipped: {args.source} not found (the real photos are only needed for this benchmark)")
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="tlpipe-kill-resume-"))
    try:
        clean, killed = tmp / "clean", tmp / "killed"
        clean.mkdir()
        classes = make_subset(args.source, tmp / "photos", args.per_class)
        write_params(clean, tmp / "photos", args)
        t_data = run(clean, stage("data", "--images", "data/images", "--out", "data/split"))
        shutil.copytree(clean, killed, symlinks=True)
        print(f"{len(classes)} classes x {args.per_class} photos, {args.image_size} px, weights {args.weights}, "
              f"batch {args.batch_size}; data stage {t_data:.1f} s")

        t_clean = run(clean, EXTRACT)
        print(f"clean run:   {t_clean:7.1f} s")
        t_killed, when = kill_extract(killed, args.kill_after)
        left = sorted(str(p.relative_to(killed / "features")) for p in (killed / "features").rglob("*")) \
            if (killed / "features").exists() else []
        print(f"killed run:  {t_killed:7.1f} s  (SIGKILL, {when}); left in features/: {', '.join(left) or 'nothing'}")
        t_resume = run(killed, EXTRACT)
        print(f"resumed run: {t_resume:7.1f} s  (killed + resumed = {t_killed + t_resume:.1f} s, "
              f"{(t_killed + t_resume) / t_clean:.2f}x the clean run)")

        same = {s: (clean / "features" / f"{s}.h5").read_bytes() == (killed / "features" / f"{s}.h5").read_bytes()
                for s in SPLITS}
        leftovers = sorted(p.name for p in (killed / "features").iterdir() if p.name.startswith("."))
        for s in SPLITS:
            print(f"  {s}.h5: {'byte-identical' if same[s] else 'DIFFERENT'}")
        if leftovers:
            print(f"  leftovers after the resumed run: {', '.join(leftovers)}")
        verdict = all(same.values()) and not leftovers
        print(f"verdict: {'PASS' if verdict else 'FAIL'}: resumed features "
              f"{'equal' if all(same.values()) else 'differ from'} an uninterrupted run's")
        return 0 if verdict else 1
    finally:
        if args.keep:
            print(f"projects kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
