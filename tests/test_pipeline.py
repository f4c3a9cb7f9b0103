"""End to end: `dvc repro` of the whole pipeline in a throw-away repo, on generated images.

One repo serves the tests in order (module-scoped): they check what a user sees, from a first
`dvc repro` to a no-op second one, a parameter change, an experiment and a bad parameter.
"""

from __future__ import annotations

import json
import h5py
import pytest

from helpers import dvc, make_project, set_params, sh, stages_run

pytestmark = pytest.mark.slow

ALL_STAGES = {"data", "extract", "train_head", "viewcache", "train_head_aug", "finetune", "evaluate", "visualize"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, class_images):
    repo = make_project(tmp_path_factory.mktemp("project"), class_images)
    first = dvc(repo, "repro")
    return repo, first


def test_first_repro_runs_every_stage_and_writes_metrics(repo):
    repo, first = repo
    assert set(stages_run(first)) >= {"data", "extract", "train_head", "evaluate"}
    metrics = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert "head" in metrics
    for key in ("accuracy", "loss", "precision", "recall", "f1"):
        assert 0.0 <= metrics["head"][key] or key == "loss"
    # Three generated classes, so a multi-class head: softmax over three columns per image.
    with h5py.File(repo / "features" / "test.h5", "r") as f:
        assert json.loads(f.attrs["class_names"]) == ["circle", "square", "stripes"]
        assert f["features"].shape[0] == f["labels"].shape[0] == len(f["paths"])
    train_metrics = json.loads((repo / "metrics" / "train_head.json").read_text())
    assert train_metrics, "train_head wrote no metrics"


def test_second_repro_runs_nothing(repo):
    repo, _ = repo
    again = dvc(repo, "repro")
    assert stages_run(again) == []
    status = dvc(repo, "status")
    assert "up to date" in status.stdout


def test_changing_head_lr_reruns_only_what_follows_the_head(repo):
    repo, _ = repo
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
    repo, _ = repo
    cache_before = (repo / "features" / "views.h5").read_bytes()
    set_params(repo, {"finetune": {"lr": 3e-5}})
    ran = set(stages_run(dvc(repo, "repro")))
    assert {"finetune", "evaluate"} <= ran
    assert not ran & {"data", "extract", "viewcache", "train_head", "train_head_aug", "augment_preview"}, ran
    assert (repo / "features" / "views.h5").read_bytes() == cache_before
    sh(["git", "checkout", "params.yaml"], repo)
    dvc(repo, "repro")


def test_every_stage_wrote_its_outputs(repo):
    repo, _ = repo
    for path in ("models/head.keras", "models/head_aug.keras", "models/finetuned.keras",
                 "features/views.h5", "plots/augment_preview.png", "reports/index.html",
                 "dvclive/finetune/plots/metrics/val/loss.tsv"):
        assert (repo / path).is_file(), path
    metrics = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert set(metrics) == {"head", "head_aug", "finetuned"}


def test_experiment_is_listed_with_its_metrics(repo):
    repo, _ = repo
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "baseline", "--allow-empty"], repo)
    dvc(repo, "exp", "run", "-n", "lr-high", "-S", "head.lr=1e-2")
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    text = json.dumps(shown)
    assert "lr-high" in text
    assert "evaluate.json" in text and "accuracy" in text


def test_mistyped_param_stops_the_stage_with_the_key_named(repo):
    repo, _ = repo
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

    repo, _ = repo
    lock = zc.lockfile.LockFile(str(repo / ".dvc" / "tmp" / "lock"))
    try:
        second = dvc(repo, "repro", check=False)
    finally:
        lock.close()
    assert second.returncode != 0
    assert "Unable to acquire lock" in second.stdout + second.stderr
