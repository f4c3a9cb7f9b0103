"""The results table (docs/results.md): the whole pipeline on any image folder, stage by stage.

Copies the project into a scratch folder, sets `data.source` (and any other `-S key=value`), runs
each stage with `dvc repro -s <stage>` in pipeline order, timing each, then prints a Markdown table:
per model the test accuracy and ROC AUC (metrics/evaluate.json), the stage that made it and its
wall time, plus the probe's cut, the machine and the exact command.

    python bench/results.py --source ../shared/datasets/cats_and_dogs_filtered -S backbone.weights=hed-bsds500

Everything is chosen on validation by the pipeline itself; the test figures here are the report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from helpers import copy_project, init_repo, set_params  # noqa: E402  (tests/helpers.py: what a user's clone holds)

MODELS = {"head": "train_head", "head_aug": "train_head_aug", "finetuned": "finetune"}
BOOK = {"head": "about 90%", "head_aug": "about 96%", "finetuned": "about 97%"}  # Chollet ch. 5, ImageNet


def parse_set(items: list[str]) -> dict:
    """`-S a.b=v` -> {"a": {"b": v}} with YAML values, as `dvc exp run -S` reads them."""
    import yaml

    out: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def stage_order(repo: Path) -> list[str]:
    """The stages in an order `dvc repro` may run them (dependencies first)."""
    import yaml

    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    outs = {o if isinstance(o, str) else next(iter(o)): name for name, s in stages.items()
            for key in ("outs", "metrics", "plots") for o in s.get(key, [])}
    done: list[str] = []

    def visit(name):
        if name in done:
            return
        for dep in stages[name].get("deps", []):
            owner = next((o for path, o in outs.items() if dep == path or dep.startswith(path + "/")), None)
            if owner and owner != name:
                visit(owner)
        done.append(name)

    for name in stages:
        visit(name)
    return done


def cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown"
    return f"{name}, {os.cpu_count()} cores"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, required=True, help="image folder (data.source)")
    ap.add_argument("-S", "--set", action="append", default=[], help="a param, as dvc exp run -S key=value")
    ap.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temp folder)")
    args = ap.parse_args(argv)

    updates = parse_set([f"data.source={args.source.resolve()}", *args.set])
    with tempfile.TemporaryDirectory() as tmp:
        repo = args.keep or Path(tmp) / "project"
        copy_project(repo)
        set_params(repo, updates)
        init_repo(repo)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        seconds = {}
        for stage in stage_order(repo):
            t = time.perf_counter()
            subprocess.run(["dvc", "repro", "-s", stage], cwd=repo, env=env, check=True, stdout=sys.stderr)
            seconds[stage] = time.perf_counter() - t
            print(f"{stage}: {seconds[stage]:.0f} s", file=sys.stderr)
        scores = json.loads((repo / "metrics" / "evaluate.json").read_text())
        cut = json.loads((repo / "features" / "cut.json").read_text())

    command = "python bench/results.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    print(f"Machine: {cpu()}. Command: `{command}`. Cut: {cut['layer']} {cut['pooling']} ({cut['chosen_by']}).")
    print()
    print("| model | test accuracy | ROC AUC | stage | stage time | the book (ImageNet weights) |")
    print("|---|---|---|---|---|---|")
    for model, stage in MODELS.items():
        s = scores.get(model, {})
        acc, auc = s.get("accuracy"), s.get("roc_auc")
        print(f"| {model} | {acc:.1%} | {auc:.3f} | {stage} | {seconds.get(stage, 0) / 60:.1f} min | {BOOK[model]} |"
              if acc is not None else f"| {model} | – | – | {stage} | – | {BOOK[model]} |")
    print()
    print("Every stage: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
          + f"; total {sum(seconds.values()) / 60:.1f} min.")


if __name__ == "__main__":
    main()
