"""dvc.yaml cannot drift from the code: each stage's `deps` list exactly the tlpipe modules its script runs.

A stage's code is its script (stages/<stage>.py) and every tlpipe module that script imports,
transitively: a static walk of `import` / `from ... import` statements anywhere in a module (inside
functions too: the stages import TensorFlow-heavy modules lazily). `from tlpipe.x import y` counts
y's file when y is a submodule, else x's `__init__.py` (the name comes from there). A package passed
through on the way (`tlpipe.features` for `tlpipe.features.extract`) counts when its `__init__.py`
runs code; one holding only a docstring and constants cannot change a stage's output unless a
constant is imported by name, and then it counts.

Each module must be covered by the stage's deps (the file, or a folder holding it), and no src
file a stage lists (or that a listed folder holds) may be one it does not run: a needless dep
reruns an expensive stage for nothing. The params half of this check (the keys a stage reads are
the ones it declares) needs the stages to run: see tests/test_pipeline.py.
"""

from __future__ import annotations

import ast
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

from helpers import BIN, REPO, dvc_stages, tool_env

SRC = REPO / "src"
PACKAGE = "tlpipe"


def module_file(name: str) -> Path | None:
    """The file of module `name` (a dotted tlpipe name), or None when it is not one of ours."""
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def runs_code(init: Path) -> bool:
    """Whether a package's __init__.py does more than hold a docstring and constants."""
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            continue
        return True
    return False


def _with_packages(name: str) -> set[Path]:
    """Module `name` plus each package above it whose __init__.py runs code on the way."""
    found = set()
    parts = name.split(".")
    for i in range(1, len(parts)):
        init = module_file(".".join(parts[:i]))
        if init is not None and init.name == "__init__.py" and runs_code(init):
            found.add(init)
    path = module_file(name)
    if path is not None:
        found.add(path)
    return found


@cache
def direct_imports(path: Path) -> frozenset[Path]:
    """The tlpipe files one file's import statements (anywhere in it) make Python run."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module_name(path) if path.is_relative_to(SRC) else ""
    found: set[Path] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    found |= _with_packages(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package upwards
                package = here if path.name == "__init__.py" else here.rpartition(".")[0]
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            found |= _with_packages(base)
            for alias in node.names:
                sub = module_file(f"{base}.{alias.name}")
                if sub is None:  # a name defined in the package's __init__.py (or a module)
                    own = module_file(base)
                    if own is not None:
                        found.add(own)
                else:
                    found.add(sub)
            if all(module_file(f"{base}.{a.name}") is not None for a in node.names):
                # `from tlpipe import atomic` reads nothing from tlpipe/__init__.py itself
                own = module_file(base)
                if own is not None and own.name == "__init__.py" and not runs_code(own):
                    found.discard(own)
    return frozenset(found)


def imported_modules(script: Path) -> set[Path]:
    """Every tlpipe file the script runs, transitively."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for path in direct_imports(todo.pop()):
            if path not in seen:
                seen.add(path)
                todo.append(path)
    return seen


def stage_script(stage: dict) -> Path:
    scripts = re.findall(r"stages/\w+\.py", stage["cmd"])
    assert len(scripts) == 1, f"expected one stages/<name>.py in {stage['cmd']!r}"
    return REPO / scripts[0]


def dep_paths(stage: dict) -> list[str]:
    return [d.rstrip("/") for d in stage.get("deps", []) if isinstance(d, str)]


def src_files_listed(deps: list[str]) -> set[Path]:
    """The .py files under src/ that the deps name, a listed folder standing for every file in it."""
    files = set()
    for dep in deps:
        path = REPO / dep
        if not path.is_relative_to(SRC):
            continue
        if path.is_dir():
            files |= modules_in(path)
        else:
            files.add(path)
    return files


def modules_in(folder: Path) -> set[Path]:
    """The .py files a listed folder stands for; a docstring-only __init__.py runs nothing, so a folder
    may hold one."""
    return {p for p in folder.rglob("*.py")
            if "__pycache__" not in p.parts and not (p.name == "__init__.py" and not runs_code(p))}


def as_deps(used: set[Path]) -> list[str]:
    """The deps lines for these files: a package folder where the stage runs every module in it."""
    folders = sorted({p.parent for p in used if p.is_relative_to(SRC) and p.parent != SRC / PACKAGE})
    whole = [d for d in folders if modules_in(d) <= used]
    top = [d for d in whole if not any(d != o and d.is_relative_to(o) for o in whole)]
    rest = [p for p in used if not any(p.is_relative_to(d) for d in top)]
    return sorted(p.relative_to(REPO).as_posix() for p in top + rest)


STAGES = dvc_stages()


def test_every_stage_runs_a_script_it_lists():
    assert STAGES
    for name, stage in STAGES.items():
        script = stage_script(stage)
        assert script.is_file(), f"{name}: {script} does not exist"
        assert script.relative_to(REPO).as_posix() in dep_paths(stage), f"{name}: deps lack {script.name}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_deps_list_exactly_the_modules_the_stage_runs(name):
    stage = STAGES[name]
    deps = dep_paths(stage)
    for dep in deps:
        if (REPO / dep).is_relative_to(SRC):
            assert (REPO / dep).exists(), f"{name}: deps list {dep}, which does not exist"
    used = imported_modules(stage_script(stage))
    # The walk is static: a module that imports by name at run time could hide a dependency.
    dynamic = [p.relative_to(REPO).as_posix() for p in sorted(used)
               if re.search(r"\bimport_module\(|\b__import__\(", p.read_text(encoding="utf-8"))]
    assert not dynamic, f"{name}: {dynamic} import modules by name; the deps check cannot follow them"
    listed = src_files_listed(deps)
    missing = sorted(p.relative_to(REPO).as_posix() for p in used - listed)
    needless = sorted(p.relative_to(REPO).as_posix() for p in listed - used)
    want = "\n".join(f"      - {d}" for d in as_deps(used))
    assert not missing and not needless, (
        f"dvc.yaml stage {name!r}: deps lack {missing}, list needlessly {needless}.\n"
        f"The modules its script runs:\n{want}")


def test_no_stage_declares_a_how_key():
    """Switching a how key (config.HOW_KEYS: train.resume, compute.strategy...) reruns nothing: no stage
    names it, nor the whole section holding it (DVC would track every key of that section)."""
    from tlpipe.config import HOW_KEYS

    for name, stage in STAGES.items():
        for item in stage.get("params", []):
            keys = item if isinstance(item, dict) else {"params.yaml": [item]}
            for key in (k for ks in keys.values() for k in (ks or [])):
                hidden = [h for h in HOW_KEYS if h == key or h.startswith(key + ".")]
                assert not hidden, f"dvc.yaml stage {name!r} declares {key!r}, so switching {hidden} reruns it"


def test_the_readme_shows_the_real_graph():
    proc = subprocess.run([str(BIN / "dvc"), "dag", "--md"], cwd=REPO, env=tool_env(), capture_output=True,
                          text=True, timeout=120, check=True)
    graph = proc.stdout.strip()
    assert graph.startswith("```mermaid") and "node" in graph
    assert graph in (REPO / "README.md").read_text(encoding="utf-8"), f"paste into README.md:\n{graph}"


# ---------------------------------------------------------------- the walk itself


def test_walk_sees_lazy_imports_submodules_and_package_inits(tmp_path):
    """The walk follows imports inside functions and `from pkg import submodule`, as Python does."""
    script = tmp_path / "stage.py"
    script.write_text(
        "from tlpipe.cli import run_stage\n"
        "def main():\n"
        "    from tlpipe.features import backbones\n"
        "    import tlpipe.evaluate.run as ev\n")
    got = {p.relative_to(SRC).as_posix() for p in imported_modules(script)}
    assert {"tlpipe/cli/__init__.py", "tlpipe/features/backbones.py", "tlpipe/evaluate/run.py",
            "tlpipe/runtime/errors.py"} <= got  # errors.py: imported by cli/__init__.py
    assert "tlpipe/train/loop.py" not in got and "tlpipe/data/sources.py" not in got
    # Packages that only hold a docstring (and constants) are passed through, not depended on.
    assert "tlpipe/features/__init__.py" not in got
    assert "tlpipe/__init__.py" not in got


def test_a_constant_imported_from_a_package_counts(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text("from tlpipe import __version__\n")
    assert imported_modules(script) == {SRC / "tlpipe" / "__init__.py"}


# ---------------------------------------------------------------- recording the params a stage reads


def _recorded(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_recording_notes_each_leaf_read_once_and_only_those(tmp_path, monkeypatch):
    from tlpipe.config import Params, load_params
    from tlpipe.features.augment import augment_settings

    log = tmp_path / "read.txt"
    monkeypatch.setenv("TLPIPE_RECORD_PARAMS", str(log))
    monkeypatch.setattr("sys.argv", ["stages/train_head.py"])
    p = load_params(REPO / "params.yaml")
    plain = Params()
    assert p.head.lr == plain.head.lr and p.finetune.from_ == plain.finetune.from_
    assert p.head.lr == plain.head.lr  # a second read adds no line
    assert _recorded(log) == ["train_head head.lr", "train_head finetune.from"]
    # A whole section handed to library code: only the fields it reads are recorded.
    settings = augment_settings(p.augment)
    assert settings == augment_settings(plain.augment)
    read = {line.split()[1] for line in _recorded(log)} - {"head.lr", "finetune.from"}
    assert read and all(k.startswith("augment.") for k in read)
    assert "augment.views" not in read and "augment.mode" not in read


def test_reading_a_section_wholesale_records_all_its_keys(tmp_path, monkeypatch):
    from tlpipe.config import load_params, param_leaves

    log = tmp_path / "read.txt"
    monkeypatch.setenv("TLPIPE_RECORD_PARAMS", str(log))
    monkeypatch.setattr("sys.argv", ["stages/data.py"])
    dumped = load_params(REPO / "params.yaml").data.model_dump()
    assert dumped["seed"] == 42
    assert sorted(_recorded(log)) == sorted(f"data {k}" for k in param_leaves() if k.startswith("data."))
    assert "data.split" in param_leaves() and "data.split.train" not in param_leaves()


def test_without_the_variable_params_are_plain(monkeypatch):
    from tlpipe.config import Params, load_params

    monkeypatch.delenv("TLPIPE_RECORD_PARAMS", raising=False)
    assert type(load_params(REPO / "params.yaml")) is Params
