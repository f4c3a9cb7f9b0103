"""Same inputs and params, same bytes, whatever the machine's core count, the engine or the number of
actors (tlpipe.runtime.threads): the features and the view cache of real-size (150 px) textured photos, with
the offline VGG16 weights, from `dvc repro` on one CPU (taskset), on Ray, and from this process (two
CPUs) and a pool of two Ray actors. Small images take other kernel paths, which is why this runs at
150 px: there, before the thread pool was fixed, one and two threads gave other float16 bytes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import dvc, make_project, set_params, sh, stages_run
from imagegen import make_textured_folders

from tlpipe.config import load_params
from tlpipe.features.cut import with_cut
from tlpipe.features.engine import Engine
from tlpipe.features.extract import BaseSpec
from tlpipe.features.all_splits import extract_splits
from tlpipe.features.viewcache import build_from_manifests

pytestmark = pytest.mark.slow

SPLIT = {"train": 4, "validation": 2, "test": 2}
PARAMS = {
    "backbone": {"weights": "hed-bsds500", "image_size": 150, "layer": "block4_pool", "pooling": "avg"},
    "compute": {"batch_size": 4},  # two batches per part: the batches of a shard must not matter either
    "augment": {"views": 2},
}


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under folder, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_here(repo: Path, out: Path, engine: Engine) -> dict[str, str]:
    """extract + viewcache of `repo`'s split, computed in this process (or on `engine`) into `out`."""
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        p = load_params()
        extract_splits("data/split", "data/images", out, BaseSpec.from_params(p.backbone),
                       batch_size=p.compute.batch_size, precision=p.compute.precision, engine=engine)
        build_from_manifests("data/split", "data/images", out / "views.h5",
                             backbone=with_cut(p.backbone, out / "cut.json"), augment=p.augment, compute=p.compute,
                             unfreeze_from=p.finetune.unfreeze_from, engine=engine, progress=False)
    finally:
        os.chdir(cwd)
    return digests(out)


@pytest.fixture(scope="module")
def one_cpu_run(tmp_path_factory):
    """The project after `taskset -c 0 dvc repro viewcache`: a machine with one core."""
    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2 or not shutil.which("taskset"):
        pytest.skip("needs two CPUs and taskset, to compare one core against two")
    tmp = tmp_path_factory.mktemp("threads")
    images = make_textured_folders(tmp / "photos", {"cat": 8, "dog": 8})
    repo = make_project(tmp / "repo", images, {**PARAMS, "data": {"source": str(images), "split": SPLIT}})
    sh(["taskset", "-c", "0", "dvc", "repro", "viewcache"], repo)
    return repo, digests(repo / "features"), (repo / "dvc.lock").read_text()


def test_one_cpu_and_two_give_the_same_bytes_here_and_on_two_ray_actors(one_cpu_run, ray_session, tmp_path):
    repo, one_cpu, _ = one_cpu_run
    assert any(k.startswith("views.shards/") for k in one_cpu) and "train.h5" in one_cpu
    local = run_here(repo, tmp_path / "local", None)  # this process: two CPUs, TensorFlow's fixed pool
    assert local == one_cpu
    assert run_here(repo, tmp_path / "ray2", Engine("ray", actors=2)) == one_cpu
    # One actor: the next test's `dvc repro` on Ray (two CPUs, one actor of INTRA_OP_THREADS).


def test_switching_the_engine_leaves_dvc_status_clean_and_dvc_lock_unchanged(one_cpu_run):
    repo, one_cpu, lock = one_cpu_run
    set_params(repo, {"compute": {"engine": "ray"}})  # compute.ray_address null: each stage starts a Ray
    try:
        assert json.loads(dvc(repo, "status", "--json", "extract", "viewcache").stdout) == {}
        assert stages_run(dvc(repo, "repro", "extract", "viewcache")) == []  # a how key: nothing to rerun
        forced = dvc(repo, "repro", "-f", "-s", "extract", "viewcache")  # on Ray now, one actor on both CPUs
        assert sorted(stages_run(forced)) == ["extract", "viewcache"]
        assert digests(repo / "features") == one_cpu
        assert (repo / "dvc.lock").read_text() == lock
    finally:
        sh(["git", "checkout", "params.yaml"], repo)
