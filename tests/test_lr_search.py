"""head.lr: auto — the head's rate chosen on validation by training it at each candidate rate."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from tlpipe.config import validate_params
from tlpipe.runtime.errors import ConfigError
from tlpipe.train import lr_search
from tlpipe.train.head import head_maker, run_train_head
from tlpipe.train.settings import TrainSettings
from tlpipe.train.trainingdata import StoredFeatures

from helpers import make_feature_project


def _rows(*losses):
    return [{"lr": lr, "best_epoch": 1, "val_loss": v, "val_accuracy": 0.5}
            for lr, v in zip(lr_search.CANDIDATES, losses)]


def test_choose_takes_the_lowest_validation_loss_never_a_nan_and_the_smaller_rate_on_ties():
    assert lr_search.choose(_rows(0.9, 0.5, 0.7)) == lr_search.CANDIDATES[1]
    assert lr_search.choose(_rows(math.nan, 0.8, 0.6)) == lr_search.CANDIDATES[2]
    assert lr_search.choose(_rows(0.4, 0.4, 0.9)) == lr_search.CANDIDATES[0]
    with pytest.raises(ValueError, match="diverged"):
        lr_search.choose(_rows(math.nan, math.nan))


def test_head_lr_accepts_auto_or_a_rate_and_nothing_else():
    assert validate_params({"head": {"lr": "auto"}}).head.lr == "auto"
    assert validate_params({"head": {"lr": 1e-3}}).head.lr == 1e-3
    with pytest.raises(ConfigError, match="head.lr"):
        validate_params({"head": {"lr": "fast"}})
    assert TrainSettings.from_params(validate_params({"head": {"lr": "auto"}}).head).lr is None


def _separable(n, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, dim)).astype("float32") + (2 * y[:, None] - 1).astype("float32") * 0.8
    return x, y.astype("int64")


def test_sweep_trains_each_rate_as_the_stage_would_and_reports_its_best_epoch():
    data = StoredFeatures(_separable(40), _separable(20, seed=1))
    head = SimpleNamespace(units=8, dropout=0.0, standardize=True)
    run = TrainSettings(epochs=3, batch_size=8, seed=1)
    rows, (lr, model, result) = lr_search.sweep(head_maker(data, 2, head, run.seed), data, run, candidates=(1e-5, 1e-2))
    assert [r["lr"] for r in rows] == [1e-5, 1e-2]
    assert all(1 <= r["best_epoch"] <= 3 and 0 <= r["val_accuracy"] <= 1 for r in rows)
    # Three epochs at 1e-5 barely move a head; at 1e-2 it separates these classes.
    assert rows[1]["val_loss"] < rows[0]["val_loss"]
    assert lr_search.choose(rows) == lr == 1e-2
    # The chosen rate's run comes back, its model holding the kept (best) epoch.
    assert result["best_epoch"] == rows[1]["best_epoch"] and np.isclose(float(model.optimizer.learning_rate), 1e-2)
    assert result["history"][result["best_epoch"] - 1]["val_loss"] == rows[1]["val_loss"]
    # Deterministic: the same sweep twice gives the same rows.
    assert lr_search.sweep(head_maker(data, 2, head, run.seed), data, run, candidates=(1e-5, 1e-2))[0] == rows


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_feature_project(tmp_path_factory.mktemp("proj"))


def test_train_head_with_auto_trains_at_the_chosen_rate_and_says_so_in_its_metrics(project, tmp_path, monkeypatch):
    monkeypatch.setattr(lr_search, "CANDIDATES", (1e-5, 1e-3))  # two rates keep the test short
    head = validate_params({"head": {"lr": "auto", "epochs": 2, "batch_size": 4, "units": 8}}).head
    metrics = tmp_path / "train_head.json"
    result = run_train_head(project / "features", tmp_path / "head.keras", metrics, tmp_path / "live", head)
    on_disk = json.loads(metrics.read_text())["head"]
    search = on_disk["lr_search"]
    assert [r["lr"] for r in search] == [1e-5, 1e-3]
    assert on_disk["lr_used"] == result["lr"] == lr_search.choose(search)
    # The saved run is the chosen rate's: an explicit run at that rate gives the same history, the same
    # dvclive metrics and the same model.
    explicit = validate_params({"head": {"lr": on_disk["lr_used"], "epochs": 2, "batch_size": 4, "units": 8}}).head
    again = run_train_head(project / "features", tmp_path / "h2.keras", tmp_path / "m2.json", tmp_path / "l2", explicit)
    assert again["history"] == result["history"]
    for name in ("train/loss", "val/accuracy"):
        tsv = [(d / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines() for d in (tmp_path / "live", tmp_path / "l2")]
        assert [r.split("\t")[1:] for r in tsv[0]] == [r.split("\t")[1:] for r in tsv[1]]  # all but the timestamp
    from tlpipe.model.saved import load_model

    weights = [load_model(tmp_path / f).get_weights() for f in ("head.keras", "h2.keras")]
    assert all(np.array_equal(a, b) for a, b in zip(*weights)) and len(weights[0]) == len(weights[1])
    assert json.loads((tmp_path / "m2.json").read_text())["h2"] == {**{k: on_disk[k] for k in (
        "best_epoch", "val_accuracy", "lr_used")}, "epochs_used": 2}  # an explicit rate: no sweep in the metrics


def test_the_report_shows_the_sweep_under_training(tmp_path):
    from tlpipe.report.build import _curves_section
    from tlpipe.report.readers import read_lr_searches

    metrics = tmp_path / "train_head.json"
    rows = [{"lr": 1e-4, "best_epoch": 9, "val_loss": 0.61, "val_accuracy": 0.7},
            {"lr": 1e-3, "best_epoch": 4, "val_loss": 0.42, "val_accuracy": 0.8}]
    metrics.write_text(json.dumps({"head": {"best_epoch": 4, "val_accuracy": 0.8, "lr_used": 1e-3,
                                              "lr_search": rows}}))
    (tmp_path / "finetune.json").write_text(json.dumps({"finetuned": {"best_epoch": 2, "val_accuracy": 0.9}}))
    assert read_lr_searches([metrics, tmp_path / "finetune.json", tmp_path / "missing.json"]) == {"train_head": rows}
    img = tmp_path / "img"
    img.mkdir()
    section = _curves_section(tmp_path / "no-dvclive", [metrics, tmp_path / "finetune.json"], img)
    assert "lr: auto" in section.intro and "learning-rate sweep" in section.table
    assert "train_head lr 0.001" in section.table and "train_head lr 0.0001" in section.table
