"""DVC experiments: queue two learning rates, run the queue, compare them in `dvc exp show`.

`dvc exp show` must read like a results table: per model the test accuracy, ROC AUC and loss, per
training stage the best epoch and its validation accuracy, each figure once, and the README's
command narrow enough for a terminal of about 200 columns."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from helpers import REPO, dvc, experiments, sh

pytestmark = pytest.mark.slow

RATES = {"lr-high": 1e-2, "lr-low": 1e-4}
MODELS = ("head", "head_aug", "finetuned")
TEST_METRICS = {"accuracy", "roc_auc", "loss"}
TRAINING = ("train_head", "train_head_aug", "finetune")
# The README's command: columns named by a path are dependencies' hashes (metrics are `key` or `file:key`).
DROP_DEPS = "[^:]*/[^:]*$"
NARROW = ["exp", "show", "--only-changed", "--drop", DROP_DEPS]
# Experiment, Created, State, Executor, head.lr, head's 3 test metrics, train_head's 2: 10.
MAX_NARROW_COLUMNS = 10


def leaf_names(d: dict, prefix: str = "") -> list[str]:
    """Metric names as DVC flattens them: nested keys joined by '.'."""
    out = []
    for k, v in d.items():
        out += leaf_names(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def md_header(md: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith("|"))
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.fixture(scope="module")
def project(tmp_path_factory, ran_project):
    repo = ran_project.copy(tmp_path_factory.mktemp("exps") / "project")  # after its first `dvc repro`
    # Commit the run: queued experiments start from dvc.lock and reuse the cached data and features.
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "baseline run"], repo)
    return repo


@pytest.fixture(scope="module")
def ran(project):
    """The two queued experiments, run: (`dvc exp run --run-all` output, `dvc exp show --json` by name)."""
    for name, lr in RATES.items():
        dvc(project, "exp", "run", "--queue", "-n", name, "-S", f"head.lr={lr}")
    # --run-all starts a queue worker and waits for every queued experiment (the helper's timeout applies).
    proc = dvc(project, "exp", "run", "--run-all")
    return proc, experiments(json.loads(dvc(project, "exp", "show", "--json").stdout))


def test_two_queued_learning_rates_run_and_differ(project, ran):
    proc, exps = ran
    # The baseline's data and features were reused, not recomputed.
    assert "Running stage 'extract'" not in proc.stdout and "Running stage 'data'" not in proc.stdout
    assert "Running stage 'train_head'" in proc.stdout
    assert set(RATES) <= set(exps), f"missing experiments: {sorted(exps)}\n{proc.stdout}"
    results = {}
    for name, lr in RATES.items():
        data = exps[name]["data"]
        assert exps[name]["error"] is None and exps[name]["state"] in (None, "success"), exps[name]
        assert data["params"]["params.yaml"]["data"]["head"]["lr"] == lr
        results[name] = data["metrics"]["metrics/evaluate.json"]["data"]["head"]
    assert results["lr-high"]["loss"] != results["lr-low"]["loss"], results
    # The workspace is untouched by queued experiments.
    assert "up to date" in dvc(project, "status").stdout


def test_exp_show_has_each_figure_once(ran):
    _, exps = ran
    for name in RATES:
        metrics = exps[name]["data"]["metrics"]
        # Only the short files: dvclive's summaries repeat the training figures and are not metrics.
        assert set(metrics) == {"metrics/evaluate.json", "metrics/extract.json",
                                *(f"metrics/{s}.json" for s in TRAINING)}, sorted(metrics)
        cut = metrics["metrics/extract.json"]["data"]
        assert sorted(leaf_names(cut)) == ["cut.layer", "cut.pooling", "cut.probe_val_accuracy"], cut
        test = metrics["metrics/evaluate.json"]["data"]
        assert set(test) == set(MODELS)
        for model in MODELS:
            assert set(test[model]) == TEST_METRICS, test[model]
            assert 0.0 <= test[model]["accuracy"] <= 1.0 and test[model]["loss"] > 0.0
        for stage in TRAINING:
            figures = metrics[f"metrics/{stage}.json"]["data"]
            model = {"train_head": "head", "train_head_aug": "head_aug", "finetune": "finetuned"}[stage]
            assert sorted(leaf_names(figures)) == [f"{model}.best_epoch", f"{model}.epochs_used", f"{model}.lr_used",
                                                   f"{model}.val_accuracy"], figures
        # 3 figures per model, 4 per training stage, 3 of the cut: nothing else reaches the table.
        assert sum(len(leaf_names(m["data"])) for m in metrics.values()) == 3 * len(MODELS) + 4 * len(TRAINING) + 3


def test_metric_names_are_unique_across_files(ran):
    _, exps = ran
    for name in RATES:
        names = Counter(n for m in exps[name]["data"]["metrics"].values() for n in leaf_names(m["data"]))
        assert [n for n, c in names.items() if c > 1] == []


def test_readme_command_is_a_narrow_table(project, ran):
    readme = (REPO / "README.md").read_text()
    assert f"dvc exp show --only-changed --drop '{DROP_DEPS}'" in readme
    md = dvc(project, *NARROW, "--md").stdout
    header = md_header(md)
    assert len(header) <= MAX_NARROW_COLUMNS, header
    assert "head.lr" in header and {f"head.{m}" for m in TEST_METRICS} <= set(header), header
    # train_head's figures are columns exactly where they differ between the rows (the baseline in the
    # workspace and the two experiments): on these generated images two rates may tie on both.
    figures = [json.loads((project / "metrics" / "train_head.json").read_text())["head"],
               *(ran[1][name]["data"]["metrics"]["metrics/train_head.json"]["data"]["head"] for name in RATES)]
    for key in ("best_epoch", "val_accuracy"):
        differ = len({f[key] for f in figures}) > 1
        assert any(h.split(":")[-1] == f"head.{key}" for h in header) == differ, (key, figures, header)
    # No dependency hash, no unchanged param (data, backbone...), no unchanged model (finetune.from is head_aug).
    assert not any(h.startswith(("data.", "backbone.", "compute.", "head_aug.", "finetuned.")) for h in header)
    assert not [h for h in header if re.fullmatch(DROP_DEPS, h)], header
    rows = {name: line for line in md.splitlines() for name in RATES if f"[{name}]" in line}
    assert set(rows) == set(RATES), md
    lr_col = header.index("head.lr")
    for name, lr in RATES.items():
        assert float([c.strip() for c in rows[name].strip("|").split("|")][lr_col]) == lr
    # In a terminal of 200 columns nothing is folded into DVC's "…".
    table = dvc(project, *NARROW, "--no-pager", env={"COLUMNS": "200"}).stdout
    assert "…" not in table and max(len(line.rstrip()) for line in table.splitlines()) <= 200, table


def test_plain_exp_show_lists_every_column(project, ran):
    """The documented way to see everything: every param and dependency, and still each metric once."""
    md = dvc(project, "exp", "show", "--md").stdout
    header = md_header(md)
    assert len(header) == len(set(header))
    metric_cols = [h for h in header if h.split(":")[-1].split(".")[-1] in TEST_METRICS | {"best_epoch",
                                                                                          "val_accuracy"}]
    assert len(metric_cols) == 3 * len(MODELS) + 2 * len(TRAINING), metric_cols
    assert {"head_aug.lr", "backbone.name", "models/head.keras"} <= set(header)
