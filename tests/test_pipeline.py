"""End to end: `dvc repro` of the whole pipeline in a throw-away repo, on generated images.

One repo serves the tests in order (module-scoped): they check what a user sees, from a first
`dvc repro` to a no-op second one, a parameter change and a bad parameter. The first run records
the params each stage reads (TLPIPE_RECORD_PARAMS), checked against dvc.yaml. Experiments run in
test_experiments.py (queued, and `dvc exp show`) and test_sharing.py (`dvc exp run`, push, pull, apply).
"""

from __future__ import annotations

import csv
import json
import math
import re

import h5py
import pytest

from helpers import dvc, dvc_stages, set_params, sh, stages_run
from tlpipe.config import HOW_KEYS, param_leaves

pytestmark = pytest.mark.slow

ALL_STAGES = set(dvc_stages())
TRAINING = ("train_head", "train_head_aug", "finetune")  # each logs to dvclive/<stage>


@pytest.fixture(scope="module")
def repo(tmp_path_factory, ran_project):
    """A copy of the project after its first repro (conftest's ran_project), that repro's output and its
    record of the params each stage read."""
    repo = ran_project.copy(tmp_path_factory.mktemp("pipeline") / "project")
    return repo, ran_project.first_repro, ran_project.params_read


def _paths(entries) -> list[str]:
    out = []
    for item in entries or []:
        out.extend([item] if isinstance(item, str) else list(item))
    return out


def test_first_repro_runs_every_stage_and_each_writes_its_outputs(repo):
    repo, first, _ = repo
    ran = stages_run(first)
    assert sorted(ran) == sorted(ALL_STAGES), ran  # each once
    for name, stage in dvc_stages(repo).items():
        for out in _paths(stage.get("outs")) + _paths(stage.get("metrics")) + _paths(stage.get("plots")):
            path = repo / out
            files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
            assert files and all(p.is_file() and p.stat().st_size > 0 for p in files), f"{name}: {out}"


def _declared(stage: dict) -> set[str] | None:
    """The leaf keys a stage declares (a section stands for its leaves); None: the whole params.yaml."""
    keys = set()
    for item in stage.get("params", []):
        if isinstance(item, dict):
            return None
        leaves = {k for k in param_leaves() if (k == item or k.startswith(item + ".")) and k not in HOW_KEYS}
        assert leaves, f"dvc.yaml declares {item!r}, which params.yaml does not have"
        keys |= leaves
    return keys


def test_each_stage_reads_exactly_the_params_it_declares(repo):
    repo, _, reads = repo
    read: dict[str, set[str]] = {}
    for line in reads.read_text().splitlines():
        script, key = line.split()
        read.setdefault(script, set()).add(key)
    assert set(read) == ALL_STAGES, "every stage reads its params through load_params"
    for name, stage in dvc_stages(repo).items():
        declared = _declared(stage)
        assert declared is not None, f"{name}: declares the whole params.yaml, how keys included"
        # DVC itself reads the keys a stage's text interpolates (`models/${finetune.from}.keras`).
        read.setdefault(name, set()).update(re.findall(r"\$\{([\w.]+)\}", json.dumps(stage)))
        read[name] -= set(HOW_KEYS)  # how, not what: read freely, declared by no stage
        # This run is in augment.mode cached; in online mode the stages read a subset of these keys
        # (the view cache's expected settings are built in both modes), so cached mode is the union.
        assert read[name] == declared, (
            f"{name}: reads but does not declare {sorted(read[name] - declared)}; "
            f"declares but does not read {sorted(declared - read[name])}")


def test_metrics_agree_with_the_predictions_and_the_curves(repo):
    repo, _, _ = repo
    with h5py.File(repo / "features" / "test.h5", "r") as f:
        assert json.loads(f.attrs["class_names"]) == ["circle", "square", "stripes"]
        assert f["features"].shape[0] == f["labels"].shape[0] == len(f["paths"])
        n_test = len(f["paths"])
    metrics = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert set(metrics) == {"head", "head_aug", "finetuned"}
    for model, m in metrics.items():
        with open(repo / "reports" / "predictions" / f"{model}.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == n_test
        # Three classes: one probability column each, summing to 1, the prediction its argmax.
        probs = [[float(r[f"p_{c}"]) for c in ("circle", "square", "stripes")] for r in rows]
        assert all(abs(sum(p) - 1) < 1e-4 for p in probs)
        right = sum(r["true"] == r["predicted"] for r in rows)
        assert m["accuracy"] == pytest.approx(right / n_test, abs=1e-6)  # stored to 6 decimals
        p_true = [float(r[f"p_{r['true']}"]) for r in rows]
        loss = -sum(math.log(min(max(p, 1e-7), 1 - 1e-7)) for p in p_true) / n_test
        assert math.isfinite(m["loss"]) and m["loss"] > 0
        assert m["loss"] == pytest.approx(loss, rel=1e-2, abs=1e-4)
        assert 0.0 <= m["roc_auc"] <= 1.0
        with open(repo / "plots" / "confusion" / f"{model}.csv", newline="") as fh:
            confusion = [(r["actual"], r["predicted"]) for r in csv.DictReader(fh)]
        assert confusion == [(r["true"], r["predicted"]) for r in rows]
    # Training: the best epoch is the one of lowest validation loss, and its accuracy is the one reported.
    for stage in TRAINING:
        model = {"train_head": "head", "train_head_aug": "head_aug", "finetune": "finetuned"}[stage]
        m = json.loads((repo / "metrics" / f"{stage}.json").read_text())[model]
        assert set(m) == {"best_epoch", "val_accuracy", "lr_used", "epochs_used"}, m
        curves = {}
        for key in ("loss", "accuracy"):
            with open(repo / "dvclive" / stage / "plots" / "metrics" / "val" / f"{key}.tsv", newline="") as fh:
                curves[key] = {int(r["step"]): float(r[key]) for r in csv.DictReader(fh, delimiter="\t")}
        # Steps from 1, one per epoch; fine-tuning logs its start model (train.keep: best's epoch 0) at step 0.
        first = 0 if stage == "finetune" else 1
        assert list(curves["loss"]) == list(range(first, m["epochs_used"] + 1))
        best = min(curves["loss"], key=lambda e: (curves["loss"][e], e))
        assert m["best_epoch"] == best
        assert m["val_accuracy"] == pytest.approx(curves["accuracy"][best], abs=1e-6)
        assert 0.0 <= m["val_accuracy"] <= 1.0


def test_second_repro_runs_nothing(repo):
    repo, _, _ = repo
    again = dvc(repo, "repro")
    assert stages_run(again) == []
    status = dvc(repo, "status")
    assert "up to date" in status.stdout


@pytest.mark.parametrize("key, value, stale, fresh", [
    # The pooling is applied after the view cache's layers: it must not rebuild the cache.
    ("backbone.pooling", "avg", "extract", {"viewcache", "data", "augment_preview"}),
    # The preview shows transforms, not how many views the cache holds.
    ("augment.views", 3, "viewcache", {"augment_preview", "extract", "train_head"}),
])
def test_a_param_makes_stale_only_the_stages_that_read_it(repo, key, value, stale, fresh):
    repo, _, _ = repo
    section, name = key.split(".")
    set_params(repo, {section: {name: value}})
    try:
        changed = set(json.loads(dvc(repo, "status", "--json").stdout))  # stages whose own deps changed
    finally:
        sh(["git", "checkout", "params.yaml"], repo)
    assert stale in changed and not changed & fresh, changed


def test_switching_how_keys_makes_nothing_stale(repo):
    # train.resume: a resumed run is identical to an uninterrupted one, so no stage declares it.
    repo, _, _ = repo
    set_params(repo, {"train": {"resume": True}, "compute": {"strategy": "default"}})
    try:
        changed = json.loads(dvc(repo, "status", "--json").stdout)
    finally:
        sh(["git", "checkout", "params.yaml"], repo)
    assert changed == {}, changed


def test_changing_head_lr_reruns_only_what_follows_the_head(repo):
    repo, _, _ = repo
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "first run"], repo)
    features_before = (repo / "features" / "train.h5").read_bytes()
    set_params(repo, {"head": {"lr": 2e-3}})
    proc = dvc(repo, "repro")
    ran = set(stages_run(proc))
    assert {"train_head", "evaluate"} <= ran
    assert not ran & {"data", "extract", "viewcache", "train_head_aug", "finetune"}, ran
    assert (repo / "features" / "train.h5").read_bytes() == features_before
    sh(["git", "checkout", "params.yaml"], repo)
    dvc(repo, "repro")


def test_changing_finetune_lr_reruns_finetune_and_evaluate_never_the_cache(repo):
    repo, _, _ = repo
    cache_before = (repo / "features" / "views.h5").read_bytes()
    # Not 3e-5: finetune.lr auto resolves to that here (0.3 x head_aug's 1e-3, capped), and a run at the
    # resolved rate writes the same model, so DVC would rightly skip evaluate.
    set_params(repo, {"finetune": {"lr": 1e-5}})
    ran = set(stages_run(dvc(repo, "repro")))
    assert {"finetune", "evaluate"} <= ran
    assert not ran & {"data", "extract", "viewcache", "train_head", "train_head_aug", "augment_preview"}, ran
    assert (repo / "features" / "views.h5").read_bytes() == cache_before
    sh(["git", "checkout", "params.yaml"], repo)
    dvc(repo, "repro")


def test_evaluating_fewer_models_reruns_evaluate_alone_and_writes_only_theirs(repo):
    repo, _, _ = repo
    set_params(repo, {"evaluate": {"models": ["head"]}})
    ran = set(stages_run(dvc(repo, "repro")))  # DVC fails a stage whose declared output is missing
    assert "evaluate" in ran and not ran & {"train_head", "train_head_aug", "finetune"}, ran
    assert sorted(p.name for p in (repo / "plots" / "confusion").iterdir()) == ["head.csv"]
    assert set(json.loads((repo / "metrics" / "evaluate.json").read_text())) == {"head"}
    sh(["git", "checkout", "params.yaml"], repo)
    dvc(repo, "repro")
    assert len(list((repo / "plots" / "confusion").iterdir())) == 3


def test_mistyped_param_stops_the_stage_with_the_key_named(repo):
    repo, _, _ = repo
    # DVC itself refuses to override a key params.yaml doesn't have...
    proc = dvc(repo, "exp", "run", "-S", "head.lr8=1", check=False)
    assert proc.returncode != 0 and "head.lr8" in proc.stdout + proc.stderr
    # ...and when forced to add it (`+key=`), our validation stops the stage and names it.
    proc = dvc(repo, "exp", "run", "-S", "+head.lr8=1", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "head.lr8: unknown key. Did you mean head.lr?" in out
    assert "Traceback" not in out
    sh(["git", "checkout", "params.yaml"], repo)


def test_a_second_repro_at_once_is_refused_by_dvc_lock(repo):
    # A running `dvc repro` holds .dvc/tmp/lock; hold it here the same way and start another.
    import zc.lockfile

    repo, _, _ = repo
    lock = zc.lockfile.LockFile(str(repo / ".dvc" / "tmp" / "lock"))
    try:
        second = dvc(repo, "repro", check=False)
    finally:
        lock.close()
    assert second.returncode != 0
    assert "Unable to acquire lock" in second.stdout + second.stderr
