"""Faults while a stage runs: SIGKILL, a full file system. Nothing half-written, and the rerun recovers.

Each scenario runs the real stage script (`python stages/<stage>.py`) in a small project folder,
kills it with SIGKILL at a known point, checks what is left on disk, reruns the stage and compares
the result byte for byte with an uninterrupted run made in this process.

To kill at a known point (not "after N seconds", which is a race on a fast or a busy machine) the
killed run goes through PAUSE_HOOK: it wraps one library function (the one that saves a chunk or a
checkpoint) so that after its Nth call the process writes a PAUSED file and sleeps; the test sees
the file and sends SIGKILL from outside, as a user's `kill -9` or an OOM killer would.
The library-level versions (an exception mid-run, injected ENOSPC) are in test_features,
test_training and test_viewcache; bench/kill_resume.py does the same on real photos by timer.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from imagegen import make_class_folders
from helpers import FEATURES_PARAMS, feature_file, stage_cmd, tool_env, user_lines, write_cut, write_params

PAUSE_HOOK = r"""
import importlib, os, runpy, sys, time
module, func, count = os.environ["TLPIPE_PAUSE_AT"].split(":")
mod = importlib.import_module(module)
real, calls = getattr(mod, func), [0]
def paused(*args, **kwargs):
    out = real(*args, **kwargs)
    calls[0] += 1
    if calls[0] == int(count):
        open("PAUSED", "w").close()
        time.sleep(3600)  # the test sends SIGKILL while we wait here
    return out
setattr(mod, func, paused)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(folder: Path, cmd: list[str], limit_fsize: int | None = None) -> subprocess.CompletedProcess:
    def set_limit():  # a file system that fills up at limit_fsize bytes per file (EFBIG, not ENOSPC)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))

    # TLPIPE_PROGRESS=1: the bars, which these tests read, show although stderr is a pipe.
    proc = subprocess.run(cmd, cwd=folder, env={**tool_env(), "TLPIPE_PROGRESS": "1"}, capture_output=True, timeout=900,
                          preexec_fn=set_limit if limit_fsize else None)
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    return proc


def kill_at(folder: Path, cmd: list[str], where: str) -> int:
    """Run cmd until PAUSE_HOOK pauses it at `where` ("module:function:call"), then SIGKILL it."""
    (folder / "PAUSED").unlink(missing_ok=True)
    env = dict(tool_env(), TLPIPE_PAUSE_AT=where)
    with open(folder / "killed.stderr", "wb") as err:
        proc = subprocess.Popen([cmd[0], "-c", PAUSE_HOOK, *cmd[1:]], cwd=folder, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 900
        while not (folder / "PAUSED").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"never reached {where} (exit {proc.returncode}):\n"
                                     + (folder / "killed.stderr").read_text(errors="replace")[-3000:])
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        return proc.wait()


def listing(folder: Path) -> list[str]:
    """Every file and folder under `folder`, hidden ones included, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ---------------------------------------------------------------- scenarios


def extract_scenario(project: Path) -> dict:
    """SIGKILL extract after train's first shard; rerun on a file system too small for its second; rerun."""
    cmd = stage_cmd("extract", "--split-dir", "data/split", "--images", "data/images", "--out", "features")
    seen = {"killed": kill_at(project, cmd, "tlpipe.features.shards:write_shard:1"),
            "after_kill": listing(project / "features")}
    # Shard 1 (4 rows of 512 floats: 8 KB and HDF5's metadata) does not fit in 4 KB.
    seen["small_fs"] = run(project, cmd, limit_fsize=4 * 1024)
    seen["after_small_fs"] = listing(project / "features")
    seen["resumed"] = run(project, cmd)
    seen["after_resume"] = listing(project / "features")
    return seen


# keep: best and patience 4: the validation labels are flipped (scenarios), so the validation loss
# rises from the first epoch on: epoch 1 is kept, its weights ride in the checkpoint of epoch 3, and
# the run stops after epoch 5 of 6.
TRAIN = {"keep": "best", "patience": 4}
HEAD = {"head": {"epochs": 6, "batch_size": 8}, "train": TRAIN, **FEATURES_PARAMS}


def train_scenario(project: Path) -> dict:
    """SIGKILL train_head after epoch 3 of 6 (it stops after 5); rerun with train.resume true and, in a
    copy, false."""
    cmd = stage_cmd("train_head", "--features", "features", "--model", "models/head.keras",
                    "--metrics", "metrics/train_head.json", "--live", "dvclive/train_head")
    seen = {"killed": kill_at(project, cmd, "tlpipe.train.checkpoint:save_checkpoint:3"),
            "after_kill": listing(project / "models"), "metrics_after_kill": (project / "metrics").exists()}
    state = project / "models" / ".head.work" / "state.json"
    seen["state"] = json.loads(state.read_text()) if state.exists() else None
    ckpt = project / "models" / ".head.work" / "epoch-0003.npz"
    if ckpt.exists():
        with np.load(ckpt) as arrays:
            seen["ckpt_keys"] = sorted(arrays.files)
    # A copy keeps train.resume false; another, made before any run, is the uninterrupted reference.
    fresh = project.with_name(project.name + "-noresume")
    shutil.copytree(project, fresh, symlinks=True)
    write_params(project, {**HEAD, "train": {**TRAIN, "resume": True}})
    with ThreadPoolExecutor(3) as pool:
        resumed, restarted = pool.submit(run, project, cmd), pool.submit(run, fresh, cmd)
        uninterrupted = pool.submit(run, project.with_name(project.name + "-reference"), cmd)
        seen["resumed"], seen["restarted"] = resumed.result(), restarted.result()
        seen["uninterrupted"] = uninterrupted.result()
    seen["after_resume"] = listing(project / "models")
    seen["fresh"] = fresh
    return seen


def viewcache_scenario(project: Path) -> dict:
    """SIGKILL the view cache after its second shard, then rerun."""
    cmd = stage_cmd("viewcache", "--split-dir", "data/split", "--images", "data/images", "--out", "features/views.h5")
    seen = {"killed": kill_at(project, cmd, "tlpipe.features.shards:write_shard:2"),
            "after_kill": listing(project / "features")}
    seen["resumed"] = run(project, cmd)
    seen["after_resume"] = listing(project / "features")
    return seen


def flip_labels(h5: Path) -> None:
    """Each row labelled with the other class: the more the head learns, the worse it validates."""
    import h5py

    with h5py.File(h5, "r+") as f:
        f["labels"][...] = 1 - f["labels"][...]


def data_split(project: Path, per_class: int, split: dict) -> None:
    from tlpipe.data.split import build_dataset

    make_class_folders(project / "src", {"circle": per_class, "square": per_class}, size=32, seed=1)
    build_dataset(project / "src", project / "data" / "images", project / "data" / "split", split=split,
                  seed=0, min_per_split=1, workers=1)


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    """All three scenarios side by side (each a few stage processes), references made meanwhile here."""
    from tlpipe.config import load_params

    root = tmp_path_factory.mktemp("faults")
    ext, trn, vc = root / "extract", root / "train", root / "viewcache"
    for p in (ext, trn, vc):
        p.mkdir()
    # 260 train rows: one resumable chunk of 256 (batch 16 x 16) and one of 4.
    data_split(ext, 134, {"train": 130, "validation": 2, "test": 2})
    write_params(ext)
    feature_file(trn / "features" / "train.h5", 24)
    flip_labels(feature_file(trn / "features" / "validation.h5", 8, seed=1))
    write_params(trn, HEAD)
    # The reference is a separate process too: a model saved from this process would carry other
    # Keras auto-generated names (counters shared with everything built here before).
    shutil.copytree(trn, trn.with_name("train-reference"))
    data_split(vc, 8, {"train": 0.5, "validation": 0.25, "test": 0.25})
    write_params(vc, {"compute": {"batch_size": 2}, "augment": {"views": 2}})
    write_cut(vc / "features", "block5_pool", "flatten")  # as the extract stage would leave it

    def guarded(fn, project):
        try:
            return fn(project)
        except Exception:
            return {"error": traceback.format_exc()}

    with ThreadPoolExecutor(3) as pool:
        futures = {"extract": pool.submit(guarded, extract_scenario, ext),
                   "train": pool.submit(guarded, train_scenario, trn),
                   "viewcache": pool.submit(guarded, viewcache_scenario, vc)}
        # The uninterrupted runs, in this process, while the stage processes work.
        from tlpipe.features.extract import BaseSpec
        from tlpipe.features.all_splits import extract_splits
        from tlpipe.features.cut import with_cut
        from tlpipe.features.viewcache import build_from_manifests

        ref = root / "reference"
        p = load_params(ext / "params.yaml")
        extract_splits(ext / "data/split", ext / "data/images", ref / "features", BaseSpec.from_params(p.backbone),
                       batch_size=p.compute.batch_size, precision=p.compute.precision)
        p = load_params(vc / "params.yaml")
        build_from_manifests(vc / "data/split", vc / "data/images", ref / "views.h5",
                             backbone=with_cut(p.backbone, vc / "features" / "cut.json"),
                             augment=p.augment, compute=p.compute, unfreeze_from=p.finetune.unfreeze_from,
                             progress=False)
        seen = {name: fut.result() for name, fut in futures.items()}
    seen["root"] = {"extract": ext, "train": trn, "viewcache": vc, "reference": ref}
    return seen


def scenario(scenarios, name) -> dict:
    seen = scenarios[name]
    if "error" in seen:
        pytest.fail(seen["error"])
    return seen


def ok(proc) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- extract


def test_extract_killed_mid_split_keeps_only_finished_shards(scenarios):
    seen = scenario(scenarios, "extract")
    assert seen["killed"] == -signal.SIGKILL
    # No feature file (finished-looking or temp), just the work folder with its one finished shard.
    assert seen["after_kill"] == [".train.h5.work", ".train.h5.work/000000.h5", ".train.h5.work/fingerprint"]


def test_extract_on_a_full_file_system_leaves_no_feature_file(scenarios):
    seen = scenario(scenarios, "extract")
    assert seen["small_fs"].returncode != 0
    # The finished shard was kept for the next run; no train.h5 and no temp file were left.
    assert seen["after_small_fs"] == [".train.h5.work", ".train.h5.work/000000.h5", ".train.h5.work/fingerprint"]


def test_extract_on_a_full_file_system_fails_with_a_clear_error(scenarios):
    proc = scenario(scenarios, "extract")["small_fs"]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = user_lines(proc.stderr)[-1]
    assert error.startswith("error: features/train.h5: cannot write features (") and "File too large" in error
    assert "rerun the extract stage (`dvc repro extract`)" in error


def test_extract_rerun_resumes_and_matches_an_uninterrupted_run_byte_for_byte(scenarios):
    seen = scenario(scenarios, "extract")
    # The runs after the kill kept shard 0 (256 rows) and computed shard 1 only.
    assert re.search(r"extract train\.h5:\s+98%\|[^\r\n]*\| 256/260 ", seen["small_fs"].stderr)
    ok(seen["resumed"])
    assert "extract train.h5" in seen["resumed"].stderr and "extract validation.h5" in seen["resumed"].stderr
    shards = [f"{s}.shards/{f}" for s in ("test", "train", "validation")
              for f in (["000000.h5", "000001.h5"] if s == "train" else ["000000.h5"]) + ["manifest.json"]]
    assert seen["after_resume"] == sorted(["cut.json", "test.h5", "train.h5", "validation.h5", "test.shards",
                                           "train.shards", "validation.shards", *shards])  # work folders removed
    root = scenarios["root"]
    for name in ("train.h5", "validation.h5", "test.h5"):
        assert (root["extract"] / "features" / name).read_bytes() == \
            (root["reference"] / "features" / name).read_bytes(), name


# ---------------------------------------------------------------- training


def test_training_killed_mid_way_leaves_no_model_file(scenarios):
    seen = scenario(scenarios, "train")
    assert seen["killed"] == -signal.SIGKILL
    assert seen["after_kill"] == [".head.work", ".head.work/epoch-0003.npz", ".head.work/state.json"]
    assert not seen["metrics_after_kill"]
    assert seen["state"]["epoch"] == 3 and len(seen["state"]["history"]) == 3
    # keep: best: epoch 1's weights (b0, b1, ...) ride beside epoch 3's (m0, ...) in the one file
    assert any(k.startswith("b") for k in seen["ckpt_keys"]) and any(k.startswith("m") for k in seen["ckpt_keys"])


def test_training_resumes_from_the_last_epoch_and_matches_an_uninterrupted_run(scenarios):
    seen = scenario(scenarios, "train")
    ok(seen["resumed"])
    assert "resuming after epoch 3 from models/.head.work" in seen["resumed"].stderr
    assert "epoch 1/6" not in seen["resumed"].stderr and "epoch 4/6" in seen["resumed"].stderr
    assert "epoch 6/6" not in seen["resumed"].stderr  # patience 4 after the best epoch, 1
    assert "kept epoch 1 of 5" in seen["resumed"].stderr
    assert seen["after_resume"] == ["head.keras"]  # checkpoints removed once finished
    ok(seen["uninterrupted"])
    trn = scenarios["root"]["train"]
    ref = trn.with_name("train-reference")
    assert json.loads((ref / "metrics/train_head.json").read_text())["head"]["best_epoch"] == 1
    assert len((ref / "dvclive/train_head/plots/metrics/val/loss.tsv").read_text().splitlines()) == 1 + 5
    for out in ("models/head.keras", "metrics/train_head.json", "dvclive/train_head/metrics.json",
                "dvclive/train_head/plots/metrics/train/loss.tsv", "dvclive/train_head/plots/metrics/val/loss.tsv"):
        assert (trn / out).read_bytes() == (ref / out).read_bytes(), out


def test_training_without_resume_starts_cleanly_over_a_stale_checkpoint(scenarios):
    seen = scenario(scenarios, "train")
    ok(seen["restarted"])
    assert "resuming" not in seen["restarted"].stderr and "epoch 1/6" in seen["restarted"].stderr
    fresh, ref = seen["fresh"], scenarios["root"]["train"].with_name("train-reference")
    assert listing(fresh / "models") == ["head.keras"]
    assert (fresh / "models/head.keras").read_bytes() == (ref / "models/head.keras").read_bytes()


# ---------------------------------------------------------------- view cache


def test_viewcache_killed_then_rerun_matches_an_uninterrupted_run(scenarios):
    seen = scenario(scenarios, "viewcache")
    assert seen["killed"] == -signal.SIGKILL
    # One shard per part here (8, 4 and 4 images; shards of 64): train's and validation's were written.
    assert seen["after_kill"] == [".views.h5.work", ".views.h5.work/fingerprint",
                                  ".views.h5.work/train-000000.h5", ".views.h5.work/validation-000000.h5",
                                  "cut.json"]
    ok(seen["resumed"])
    assert seen["after_resume"] == ["cut.json", "views.h5", "views.shards", "views.shards/manifest.json",
                                    "views.shards/test-000000.h5", "views.shards/train-000000.h5",
                                    "views.shards/validation-000000.h5"]
    root = scenarios["root"]
    assert (root["viewcache"] / "features/views.h5").read_bytes() == (root["reference"] / "views.h5").read_bytes()
