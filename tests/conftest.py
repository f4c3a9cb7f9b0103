"""Fixtures only; the helpers tests share live in helpers.py (`from helpers import ...`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlpipe.cli import start

start()  # as a stage does, first: Keras on TensorFlow, TensorFlow's thread pool fixed (tlpipe.threads)


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
