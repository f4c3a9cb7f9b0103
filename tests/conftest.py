"""Fixtures only; the helpers tests share live in helpers.py (`from helpers import ...`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from filelock import FileLock

from helpers import RanProject, dvc, make_project

from tlpipe.cli import start

start()  # as a stage does, first: Keras on TensorFlow, TensorFlow's thread pool fixed (tlpipe.runtime.threads)

# What starts Ray (the ray_session fixture, the ray engine through dvc, bench/scale.py): one xdist group.
RAY_FILES = {"test_ray_engine.py", "test_thread_determinism.py"}
RAY_TESTS = {"test_bench_smoke.py::test_scale"}
# Files whose tests are independent runs of their own (no shared state but a cheap fixture): one group per test.
PER_TEST_FILES = {"test_bench_smoke.py"}
# The groups that take minutes, longest first (`pytest --durations=0` at f83f016, alone on the machine; only
# the order matters). xdist hands out groups in collection order (--no-loadscope-reorder, pyproject.toml): the
# long ones start first and the short ones fill the end, instead of one long group running alone at the end.
LONG_FIRST = ("ray", "test_every_cut.py", "test_sharing.py", "test_pipeline.py",
              "test_bench_smoke.py::test_results_and_grid", "test_finetune_cut.py", "test_experiments.py",
              "test_finetune.py", "test_training_gpus.py", "test_training.py", "test_faults.py",
              "test_stage_errors.py", "test_bench_smoke.py::test_threads", "test_keep_best.py", "test_bench_smoke.py::test_probe_then_standardize")


def group_of(item) -> str:
    name = item.path.name
    test = f"{name}::{item.originalname}"
    if name in RAY_FILES or test in RAY_TESTS:
        return "ray"
    return test if name in PER_TEST_FILES else name


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups to schedule them
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2 --dist loadgroup`, pyproject.toml): each file runs whole on one worker,
    in order, with its module fixtures made once; everything that starts Ray runs on the same worker;
    the long groups come first."""
    rank = {group: i for i, group in enumerate(LONG_FIRST)}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group_of(item)))
    # A stable sort: each group keeps its tests' order; groups not listed keep collection order.
    items.sort(key=lambda item: rank.get(group_of(item), len(LONG_FIRST)))


def pytest_configure(config):
    """xdist groups by a suffix it writes into each node id; from pytest 9.2 that write does nothing
    (pytest-xdist#1386), and files would split across workers and fail in odd ways: stop clearly."""
    from packaging.version import Version

    if getattr(config.option, "dist", None) == "loadgroup" and Version(pytest.__version__) >= Version("9.2"):
        raise pytest.UsageError(f"pytest {pytest.__version__}: pytest-xdist's --dist loadgroup no longer groups "
                                "tests (pytest-xdist#1386); install the test extra (pytest<9.2) or run with -n 0")


def made_once(root: Path, build) -> Path:
    """`build(root)` once per run, by whichever worker asks first; the others wait on the lock. A `.done`
    marker says it finished: a folder without one (a worker stopped half-way) is removed and built again."""
    with FileLock(f"{root}.lock"):
        if not (root / ".done").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            build(root)
            (root / ".done").touch()
    return root


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory) -> Path:
    """A folder every xdist worker of this run sees (the parent of the workers' own base folders); what is
    made in it is made under a FileLock, by the first worker to need it."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def class_images(shared_tmp) -> Path:
    """Three visually distinct classes of small generated images (a local `data.source`); read-only."""
    from imagegen import make_class_folders

    return made_once(shared_tmp / "class-images", lambda root: make_class_folders(
        root, classes={"circle": 16, "square": 16, "stripes": 16}, size=48, seed=0))


@pytest.fixture(scope="session")
def ran_project(shared_tmp, class_images) -> RanProject:
    """A project on class_images (FAST_PARAMS) after its first `dvc repro`, made once per run whatever the
    worker (test_pipeline, test_experiments and test_sharing each start from a copy: RanProject.copy). The
    repro records the params each stage reads (TLPIPE_RECORD_PARAMS) for test_pipeline."""
    def first_repro(root: Path) -> None:
        repo = make_project(root / "repo", class_images)
        proc = dvc(repo, "repro", env={"TLPIPE_RECORD_PARAMS": str(root / "params-read.txt")})
        (root / "repro.stdout").write_text(proc.stdout)
        (root / "repro.stderr").write_text(proc.stderr)

    return RanProject(made_once(shared_tmp / "ran-project", first_repro))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray of 2 CPUs for the whole run (starting one costs seconds), shut down at the end.
    The engine joins a session already started rather than starting its own."""
    import logging

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()
