"""What the tests share: throw-away projects, running stages and dvc as a user does, small feature files.

Import from any test (tests/ is on sys.path): `from helpers import make_project, dvc, ...`.
Fixtures live in conftest.py; nothing here is a fixture, and no test imports another test.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

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

# TensorFlow's C++ start-up lines reach stderr before any Python runs and ignore
# TF_CPP_MIN_LOG_LEVEL (TF 2.21); they are not ours, so they are left out of "what the user sees".
TF_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IWEF]\d{4} \d\d:\d\d:\d\d)")


# ---------------------------------------------------------------- commands, as a user runs them


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


def sh(args: list[str], cwd: Path, check: bool = True, timeout: int = 900,
       env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command in the test repo; on failure show its output, not just the exit status."""
    proc = subprocess.run(args, cwd=cwd, env={**tool_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def dvc(repo: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    return sh([str(BIN / "dvc"), *args], repo, check=check, env=env)


def stages_run(proc: subprocess.CompletedProcess) -> list[str]:
    """Names of the stages `dvc repro` / `dvc exp run` actually ran (not skipped)."""
    ran = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("Running stage '"):
            ran.append(line.split("'")[1])
    return ran


def stage_cmd(stage: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "stages" / f"{stage}.py"), *args]


def user_lines(stderr: str) -> list[str]:
    """What stays on the user's terminal: no TensorFlow C++ start-up lines, no erased progress bars."""
    shown = (line.split("\r")[-1] for line in stderr.split("\n"))  # a bar redraws (and erases) with \r
    return [line for line in shown if line.strip() and not TF_NOISE.match(line)]


def load_stage(name: str):
    """stages/<name>.py as a module, to call its main() in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- params and projects


def dvc_stages(repo: Path = REPO) -> dict:
    """The stages of a project's dvc.yaml, by name (as written: `${...}` not interpolated)."""
    return yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]



def deep_update(base: dict, updates: dict) -> dict:
    """`updates` merged into `base` (in place); values are copied, so `base` never shares a dict
    with `updates` (shared dicts let one test's params leak into FAST_PARAMS for the next)."""
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def set_params(repo: Path, updates: dict) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(deep_update(params, updates), sort_keys=False))


def write_params(folder: Path, updates: dict | None = None, source: Path | None = None) -> None:
    """folder/params.yaml: the project's, made fast (FAST_PARAMS), then `updates`."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    deep_update(params, copy.deepcopy(FAST_PARAMS))
    if source is not None:
        params["data"]["source"] = str(source)
    deep_update(params, updates or {})
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))


def copy_project(dst: Path) -> Path:
    """What a user's clone holds (PROJECT_FILES), copied into dst; also used by bench/sharing.py."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


def init_repo(dst: Path) -> Path:
    """Commit dst as a fresh git + DVC repo."""
    sh(["git", "init", "-q", "-b", "main"], dst)
    if not (dst / ".dvc" / "config").exists():
        dvc(dst, "init", "-q")
    sh(["git", "add", "-A"], dst)
    sh(["git", "commit", "-q", "-m", "project"], dst)
    return dst


def make_project(dst: Path, source: Path, params: dict | None = None) -> Path:
    """Copy the project into dst, point it at `source`, and commit it as a fresh git + DVC repo."""
    copy_project(dst)
    set_params(dst, deep_update(copy.deepcopy(FAST_PARAMS), {"data": {"source": str(source)}, **(params or {})}))
    return init_repo(dst)


class RanProject:
    """A project after its first `dvc repro` (conftest's ran_project): the repro's output and params record."""

    def __init__(self, root: Path):
        self.root = root
        self.params_read = root / "params-read.txt"
        self.first_repro = subprocess.CompletedProcess(["dvc", "repro"], 0, (root / "repro.stdout").read_text(),
                                                       (root / "repro.stderr").read_text())

    def copy(self, dst: Path) -> Path:
        """The repo (git, DVC cache and outputs) copied to dst: a project of one's own to change."""
        shutil.copytree(self.root / "repo", dst, symlinks=True)
        return dst


# ---------------------------------------------------------------- feature files

FEATURE_SIZE = 32  # VGG16's smallest input; weights "none" keeps everything offline
FEATURE_LAYER = "block3_pool"
FEATURES_PARAMS = {"backbone": {"layer": FEATURE_LAYER, "pooling": "avg"}}  # what feature_file writes


class HeadParams:
    """A small, fast `head` section."""
    units, dropout, lr, epochs, batch_size, seed = 16, 0.5, 1e-3, 3, 4, 1
    standardize = True


def write_features(path, features, labels, paths, attrs):
    """A feature file in the format of docs/design.md."""
    import h5py
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.asarray(features, np.float32))
        f.create_dataset("labels", data=np.asarray(labels, np.int64))
        f.create_dataset("paths", data=[p.encode() for p in paths], dtype=h5py.string_dtype("utf-8"))
        for k, v in attrs.items():
            f.attrs[k] = v


def feature_file(path: Path, n: int, classes=("cat", "dog"), image_size: int = FEATURE_SIZE,
                 backbone: str = "vgg16", layer: str = FEATURE_LAYER, dim: int = 256, seed: int = 0) -> Path:
    """A small feature file in the format of docs/design.md (random features, weights none)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(classes)
    write_features(path, rng.normal(size=(n, dim)) + labels[:, None], labels,
                   [f"{classes[l]}/{i}.png" for i, l in enumerate(labels)],
                   {"backbone": backbone, "weights": "none", "weights_sha256": "", "layer": layer,
                    "pooling": "avg", "image_size": image_size, "preprocessing": "caffe",
                    "class_names": json.dumps(list(classes)), "tlpipe_format": 1})
    write_cut(path.parent, layer, "avg")
    return path


def write_cut(features_dir: Path, layer: str, pooling: str) -> None:
    """features/cut.json as the extract stage writes it for a named layer and pooling."""
    from tlpipe.features import cut

    cut.write_cut(Path(features_dir) / cut.CUT_FILE, layer, pooling, "params", [])


def make_feature_project(root, classes=("cat", "dog"), counts=None, seed=0):
    """data/images, data/split/*.csv + classes.json and features/*.h5 (VGG16, random weights, 32 px)."""
    import numpy as np
    from imagegen import draw_class_image

    from tlpipe.features import backbones, pretrained
    from tlpipe.features.inputs import image_dataset

    counts = counts or {"train": 8, "validation": 4, "test": 6}
    root = Path(root)
    images, split = root / "data" / "images", root / "data" / "split"
    images.mkdir(parents=True)
    split.mkdir(parents=True)
    (split / "classes.json").write_text(json.dumps({"classes": list(classes)}))
    rng = np.random.default_rng(seed)
    base = pretrained.build_base("vgg16", "none", FEATURE_SIZE)
    # Truncated early and averaged: a small model (fast saves) that still exercises the format.
    fmodel = backbones.feature_model(base, FEATURE_LAYER, "avg")
    attrs = {"backbone": "vgg16", "weights": "none", "weights_sha256": "", "layer": FEATURE_LAYER,
             "pooling": "avg", "image_size": FEATURE_SIZE, "preprocessing": "caffe",
             "class_names": json.dumps(list(classes)), "tlpipe_format": 1}
    for part, n in counts.items():
        rows = []
        for label, name in enumerate(classes):
            for i in range(n):
                im = draw_class_image(label, size=FEATURE_SIZE, rng=rng)
                tmp = images / "tmp.png"
                im.save(tmp)
                sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
                os.replace(tmp, images / f"{sha}.png")
                rows.append((f"{name}/{part}_{i:03d}.png", name, label, sha, f"{sha}.png"))
        rows.sort()
        lines = ["path,class_name,label,sha256,file"] + [",".join(map(str, r)) for r in rows]
        (split / f"{part}.csv").write_text("\n".join(lines) + "\n")
        files = [str(images / r[4]) for r in rows]
        feats = np.concatenate([fmodel(b).numpy() for b in image_dataset(files, FEATURE_SIZE, 16, "caffe")])
        write_features(root / "features" / f"{part}.h5", feats, [r[2] for r in rows], [r[0] for r in rows], attrs)
    write_cut(root / "features", FEATURE_LAYER, "avg")
    return root


def extract_split(manifest_csv, images_dir, out_h5, spec, classes, batch_size: int = 32, precision: str = "float32",
                  *, extractor=None, chunk_rows=None, engine=None) -> Path:
    """One split's feature file at a named cut, by the extract stage's own steps (features.extract's
    compute_split and assemble_split; the stage runs them for every split at once, in features.all_splits)."""
    from tlpipe.features.extract import Extractor, assemble_split, compute_split

    extractor = extractor or Extractor(spec, precision)
    split = compute_split(manifest_csv, images_dir, out_h5, extractor, classes, batch_size, chunk_rows, engine)
    assemble_split(split, extractor.dim, extractor.attrs(classes))
    shutil.rmtree(split.work, ignore_errors=True)
    return split.out


# ---------------------------------------------------------------- a split of generated images

def stored_cats_and_dogs(root: Path, per_class: int = 6, size: int = 40) -> tuple[Path, list[dict]]:
    """Generated cat and dog images in root/data/images, as the data stage stores them, and their
    manifest rows (cats first, then dogs)."""
    from imagegen import make_class_folders

    written = make_class_folders(root / "src", {"cat": per_class, "dog": per_class}, size=size)
    images = root / "data" / "images"
    images.mkdir(parents=True)
    rows = []
    for label, name in enumerate(written):
        for p in written[name]:
            (images / p.name).write_bytes(p.read_bytes())
            rows.append({"path": f"{name}/{p.name}", "class_name": name, "label": label, "sha256": "x",
                         "file": p.name})
    return images, rows


def image_parts(root: Path, per_class: int) -> dict[str, tuple[list, list, list]]:
    """Generated cat and dog images split per class into train (all but two), validation (one) and
    test (one): {part: (files, labels, paths)}, as the view cache's builders take them."""
    from imagegen import make_class_folders

    written = make_class_folders(root, {"cat": per_class, "dog": per_class}, size=40)
    rows = [(str(p), label, f"{name}/{p.name}") for label, name in enumerate(written) for p in written[name]]
    n = per_class
    split = {"train": rows[0:n - 2] + rows[n:2 * n - 2], "validation": [rows[n - 2], rows[2 * n - 2]],
             "test": [rows[n - 1], rows[2 * n - 1]]}
    return {k: tuple(map(list, zip(*v))) for k, v in split.items()}


def write_split(root: Path, parts: dict[str, list[dict]], classes=("cat", "dog")) -> Path:
    """root/data/split: one manifest per part (rows sorted by path, as the data stage writes them)."""
    import pandas as pd

    split = root / "data" / "split"
    split.mkdir(parents=True)
    for part, rows in parts.items():
        pd.DataFrame(sorted(rows, key=lambda x: x["path"])).to_csv(split / f"{part}.csv", index=False)
    (split / "classes.json").write_text(json.dumps({"classes": list(classes)}))
    return split


def experiments(show: list) -> dict[str, dict]:
    """{experiment name: its data (params, metrics)} from `dvc exp show --json` (DVC 3 layout)."""
    found = {}
    for baseline in show:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name"):
                    found[rev["name"]] = {"data": rev.get("data") or {}, "error": rev.get("error"),
                                          "state": (exp.get("executor") or {}).get("state")}
    return found


def read_model_info(path) -> dict:
    """A saved model's tlpipe metadata without building it (config.json only): what model_info(load_model)
    would return, for tests that check a stage's output cheaply."""
    import zipfile

    from tlpipe.model.saved import INFO_KEYS

    with zipfile.ZipFile(path) as zf:
        config = json.loads(zf.read("config.json"))
    for layer in config.get("config", {}).get("layers", []):
        if layer.get("class_name") == "Preprocess" or layer.get("registered_name") == "tlpipe>Preprocess":
            info = layer.get("config", {}).get("info", {})
            return {k: info.get(k) for k in INFO_KEYS}
    raise AssertionError(f"{path}: no Preprocess layer")
