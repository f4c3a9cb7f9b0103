"""Shared fixtures: a throw-away copy of the project as its own git + DVC repo, on generated images."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# What a user's clone holds; outputs and caches are left behind.
PROJECT_FILES = ["dvc.yaml", "params.yaml", ".gitignore", ".dvcignore", "stages", "src", ".dvc/config"]

# Small and fast: 32 px is VGG16's minimum; random weights keep the tests offline.
FAST_PARAMS = {
    "backbone": {"weights": "none", "image_size": 32},
    "compute": {"batch_size": 16},
    "head": {"units": 16, "epochs": 3, "batch_size": 8, "lr": 1e-3},
    "augment": {"views": 2},
    "head_aug": {"epochs": 2, "batch_size": 8, "lr": 1e-3},
    "finetune": {"epochs": 1, "batch_size": 8},
    "visualize": {"images": 1, "layers": 2, "filters": 2, "filter_steps": 2,
                  "filter_layers": ["block1_conv1"], "gradcam_per_class": 1},
}


def tool_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("GIT_AUTHOR_NAME", "tlpipe-tests")
    env.setdefault("GIT_AUTHOR_EMAIL", "tests@example.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "tlpipe-tests")
    env.setdefault("GIT_COMMITTER_EMAIL", "tests@example.invalid")
    return env


def sh(args: list[str], cwd: Path, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a command in the test repo; on failure show its output, not just the exit status."""
    proc = subprocess.run(args, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh([str(BIN / "dvc"), *args], repo, check=check)


def deep_update(base: dict, updates: dict) -> dict:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def set_params(repo: Path, updates: dict) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(deep_update(params, updates), sort_keys=False))


def make_project(dst: Path, source: Path, params: dict | None = None) -> Path:
    """Copy the project into dst, point it at `source`, and commit it as a fresh git + DVC repo."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    set_params(dst, deep_update(deep_update({}, FAST_PARAMS), {"data": {"source": str(source)}, **(params or {})}))
    sh(["git", "init", "-q", "-b", "main"], dst)
    if not (dst / ".dvc" / "config").exists():
        dvc(dst, "init", "-q")
    sh(["git", "add", "-A"], dst)
    sh(["git", "commit", "-q", "-m", "project"], dst)
    return dst


def stages_run(proc: subprocess.CompletedProcess) -> list[str]:
    """Names of the stages `dvc repro` / `dvc exp run` actually ran (not skipped)."""
    ran = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("Running stage '"):
            ran.append(line.split("'")[1])
    return ran


@pytest.fixture(scope="session")
def class_images(tmp_path_factory) -> Path:
    """Three visually distinct classes of small generated images (a local `data.source`)."""
    from imagegen import make_class_folders

    root = tmp_path_factory.mktemp("images")
    make_class_folders(root, classes={"circle": 16, "square": 16, "stripes": 16}, size=48, seed=0)
    return root
