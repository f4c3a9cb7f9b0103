"""DVC experiments: queue two learning rates, run the queue, compare them in `dvc exp show`."""

from __future__ import annotations

import json

import pytest

from helpers import dvc, make_project, sh

pytestmark = pytest.mark.slow

RATES = {"lr-high": 1e-2, "lr-low": 1e-4}


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


@pytest.fixture(scope="module")
def project(tmp_path_factory, class_images):
    repo = make_project(tmp_path_factory.mktemp("exps"), class_images)
    dvc(repo, "repro")
    # Commit the run: queued experiments start from dvc.lock and reuse the cached data and features.
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "baseline run"], repo)
    return repo


def test_two_queued_learning_rates_run_and_differ(project):
    for name, lr in RATES.items():
        dvc(project, "exp", "run", "--queue", "-n", name, "-S", f"head.lr={lr}")
    # --run-all starts a queue worker and waits for every queued experiment (conftest's timeout applies).
    proc = dvc(project, "exp", "run", "--run-all")
    # The baseline's data and features were reused, not recomputed.
    assert "Running stage 'extract'" not in proc.stdout and "Running stage 'data'" not in proc.stdout
    assert "Running stage 'train_head'" in proc.stdout

    exps = experiments(json.loads(dvc(project, "exp", "show", "--json").stdout))
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


def test_exp_show_only_changed_markdown_table(project):
    md = dvc(project, "exp", "show", "--only-changed", "--md").stdout
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert "head.lr" in header and "Experiment" in header
    # Only what differs between experiments: data and backbone settings are the same everywhere.
    assert not any(h.startswith(("data.", "backbone.", "compute.")) for h in header), header
    rows = {name: line for line in lines[2:] for name in RATES if f"[{name}]" in line}
    assert set(rows) == set(RATES), md
    lr_col = header.index("head.lr")
    for name, lr in RATES.items():
        cells = [cell.strip() for cell in rows[name].strip("|").split("|")]
        assert float(cells[lr_col]) == lr
