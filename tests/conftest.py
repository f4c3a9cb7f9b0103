"""Fixtures only; the helpers tests share live in helpers.py (`from helpers import ...`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlpipe.cli import start

start()  # as a stage does, first: Keras on TensorFlow, TensorFlow's thread pool fixed (tlpipe.runtime.threads)

# What starts Ray (the ray_session fixture, the ray engine through dvc, bench/scale.py): one xdist group.
RAY_FILES = {"test_ray_engine.py", "test_thread_determinism.py"}
RAY_TESTS = {"test_bench_smoke.py::test_scale"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups to schedule them
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2 --dist loadgroup`, pyproject.toml): each file runs whole on one worker,
    in order, with its module fixtures made once; everything that starts Ray runs on the same worker."""
    for item in items:
        name = item.path.name
        ray = name in RAY_FILES or f"{name}::{item.originalname}" in RAY_TESTS
        item.add_marker(pytest.mark.xdist_group("ray" if ray else name))


def pytest_configure(config):
    """xdist groups by a suffix it writes into each node id; from pytest 9.2 that write does nothing
    (pytest-xdist#1386), and files would split across workers and fail in odd ways: stop clearly."""
    from packaging.version import Version

    if getattr(config.option, "dist", None) == "loadgroup" and Version(pytest.__version__) >= Version("9.2"):
        raise pytest.UsageError(f"pytest {pytest.__version__}: pytest-xdist's --dist loadgroup no longer groups "
                                "tests (pytest-xdist#1386); install the test extra (pytest<9.2) or run with -n 0")

@pytest.fixture(scope="session")
def class_images(tmp_path_factory) -> Path:
    """Three visually distinct classes of small generated images (a local `data.source`)."""
    from imagegen import make_class_folders

    root = tmp_path_factory.mktemp("images")
    make_class_folders(root, classes={"circle": 16, "square": 16, "stripes": 16}, size=48, seed=0)
    return root


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray of 2 CPUs for the whole run (starting one costs seconds), shut down at the end.
    The engine joins a session already started rather than starting its own."""
    import logging

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()
