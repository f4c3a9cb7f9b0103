"""loop.fit: determinism, dvclive output, checkpoints and resume."""

import contextlib
import json

import numpy as np
import pytest

from tlpipe import atomic
from tlpipe.runtime.errors import ConfigError
from tlpipe.model.dense_head import build_head
from tlpipe.train import loop as training
from tlpipe.train.compile import compile_classifier
from tlpipe.train.settings import TrainSettings
from tlpipe.train.trainingdata import StoredFeatures


@contextlib.contextmanager
def warned(capsys, text):
    """The block logs a tlpipe warning containing `text` (on stderr, as a stage shows it)."""
    capsys.readouterr()
    yield
    err = capsys.readouterr().err
    assert any(line.startswith("warning: ") and text in line for line in err.splitlines()), err


def _data(n, dim=12, seed=0):
    # Two separable-ish blobs: the head learns something, so metrics change between epochs.
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype("int64")
    x = rng.normal(size=(n, dim)).astype("float32") + y[:, None].astype("float32") * 0.8
    return x, y


def _model(dim=12, n_classes=2, seed=3):
    return compile_classifier(build_head(dim, n_classes, units=16, dropout=0.5, seed=seed), n_classes, 1e-2)


def _stored(n_train, n_val):
    return StoredFeatures(_data(n_train), _data(n_val, seed=1))


def _run(tmp_path, name, epochs=4, **kw):
    model = _model()
    res = training.fit(model, _stored(60, 20), epochs=epochs, batch_size=8, seed=7,
                       live_dir=tmp_path / name / "live", **kw)
    return model, res


def _tsv(live_dir, key):
    return (live_dir / "plots" / "metrics" / f"{key}.tsv").read_text()


def test_same_params_give_identical_history_and_weights(tmp_path):
    m1, r1 = _run(tmp_path, "a")
    m2, r2 = _run(tmp_path, "b")
    assert r1["history"] == r2["history"]
    assert len(r1["history"]) == 4
    # Training did something: losses differ between epochs.
    assert len({row["train_loss"] for row in r1["history"]}) > 1
    for a, b in zip(m1.get_weights(), m2.get_weights()):
        np.testing.assert_array_equal(a, b)
    for key in ("train/loss", "train/accuracy", "val/loss", "val/accuracy"):
        assert _tsv(tmp_path / "a" / "live", key) == _tsv(tmp_path / "b" / "live", key)


def test_other_seed_changes_history(tmp_path):
    r = [training.fit(_model(), _stored(60, 20), epochs=2, batch_size=8, seed=s, live_dir=tmp_path / str(s))["history"]
         for s in (1, 2)]
    assert r[0] != r[1]


def test_dvclive_files_and_summary(tmp_path):
    _, res = _run(tmp_path, "a", epochs=3)
    live = tmp_path / "a" / "live"
    lines = _tsv(live, "val/accuracy").splitlines()
    assert lines[0].split("\t") == ["step", "accuracy"]
    assert [ln.split("\t")[0] for ln in lines[1:]] == ["1", "2", "3"]  # step = epoch, from 1
    assert json.loads((live / "metrics.json").read_text())["step"] == 3
    assert float(lines[-1].split("\t")[1]) == pytest.approx(res["last"]["val_accuracy"], abs=1e-6)
    # dvclive must not write a dvc.yaml or a report of its own.
    assert not (live / "dvc.yaml").exists() and not (tmp_path / "dvc.yaml").exists()
    assert not list(live.glob("report.*"))
    hist = res["history"]
    best = min(range(3), key=lambda i: hist[i]["val_loss"])
    assert res["epochs"] == 3 and res["best_epoch"] == best + 1
    assert res["best"] == hist[best] and res["last"] == hist[-1]


class Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    data = _stored(60, 20)
    work = tmp_path / "work"
    full_model = _model()
    full = training.fit(full_model, data, epochs=5, batch_size=8, seed=7, live_dir=tmp_path / "full")

    def stop(epoch, row):
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        training.fit(_model(), data, epochs=5, batch_size=8, seed=7, live_dir=tmp_path / "part",
                     checkpoint_dir=work, on_epoch_end=stop)
    state = json.loads((work / "state.json").read_text())
    assert state["epoch"] == 2 and [p.name for p in work.glob("*.npz")] == ["epoch-0002.npz"]

    # A fresh process would build a fresh model: use another init seed to prove the checkpoint wins.
    resumed_model = _model(seed=99)
    resumed = training.fit(resumed_model, data, epochs=5, batch_size=8, seed=7, live_dir=tmp_path / "part",
                           checkpoint_dir=work, resume=True)
    assert resumed["history"] == full["history"]
    for a, b in zip(full_model.get_weights(), resumed_model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for key in ("train/loss", "val/accuracy"):
        assert _tsv(tmp_path / "part", key) == _tsv(tmp_path / "full", key)
    assert not work.exists()  # a finished run removes its checkpoints


def test_resume_false_discards_stale_checkpoint(tmp_path):
    data = _stored(40, 10)
    work = tmp_path / "work"
    work.mkdir()
    (work / "state.json").write_text("{}")
    (work / "epoch-0009.npz").write_bytes(b"junk")
    res = training.fit(_model(), data, epochs=2, batch_size=8, seed=7, live_dir=tmp_path / "l",
                       checkpoint_dir=work, resume=False, keep_checkpoint=True)
    assert res["epochs"] == 2
    assert sorted(p.name for p in work.iterdir()) == ["epoch-0002.npz", "state.json"]


def test_resume_with_checkpoint_of_other_settings_starts_again(tmp_path, capsys):
    data = _stored(40, 10)
    work = tmp_path / "work"
    training.fit(_model(), data, epochs=2, batch_size=8, seed=7, live_dir=tmp_path / "l",
                 checkpoint_dir=work, keep_checkpoint=True)
    with warned(capsys, "other settings"):
        res = training.fit(_model(), data, epochs=2, batch_size=4, seed=7, live_dir=tmp_path / "l",
                           checkpoint_dir=work, resume=True)
    assert [r["epoch"] for r in res["history"]] == [1, 2]


def test_an_uncompiled_model_is_refused(tmp_path):
    data = StoredFeatures(_data(10), _data(10))
    with pytest.raises(ConfigError, match="compiled"):
        training.fit(build_head(12, 2), data, epochs=1, batch_size=4, seed=1, live_dir=tmp_path)


def test_write_json_sorted_rounded_atomic(tmp_path):
    path = atomic.write_json(tmp_path / "m" / "x.json", {"b": 1 / 3, "a": {"z": 2.0, "y": [0.1234567891]}})
    assert path.read_text() == '{\n  "a": {\n    "y": [\n      0.123457\n    ],\n    "z": 2.0\n  },\n  "b": 0.333333\n}\n'
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_epoch_order_depends_on_seed_and_epoch_only():
    a = training.epoch_order(50, 1, 3)
    np.testing.assert_array_equal(a, training.epoch_order(50, 1, 3))
    assert sorted(a) == list(range(50))
    assert not np.array_equal(a, training.epoch_order(50, 1, 4))
    assert not np.array_equal(a, training.epoch_order(50, 2, 3))


def test_metrics_of_is_the_best_epoch_under_the_model_name():
    """The training stages' metrics file: the best epoch (lowest val loss, earliest on ties), not the last,
    under the model file's name."""
    rows = [{"epoch": 1, "val_loss": 0.9, "val_accuracy": 0.5}, {"epoch": 2, "val_loss": 0.4, "val_accuracy": 0.75},
            {"epoch": 3, "val_loss": 0.4, "val_accuracy": 0.8}, {"epoch": 4, "val_loss": 0.6, "val_accuracy": 0.9}]
    run = TrainSettings(epochs=4, batch_size=2, seed=0, lr=1e-4)
    assert training.metrics_of(training.summarize(rows), "models/head_aug.keras", run) == {
        "head_aug": {"best_epoch": 2, "val_accuracy": 0.75, "lr_used": 1e-4, "epochs_used": 4}}
    sweep = [{"lr": 1e-4, "best_epoch": 2, "val_loss": 0.4, "val_accuracy": 0.75}]
    assert training.metrics_of(training.summarize(rows), "models/head_aug.keras", run, sweep)["head_aug"][
        "lr_search"] == sweep


class Recording:
    """A data source that records which epochs fit asks for; its data differ by epoch."""

    def __init__(self, tag="a"):
        self.asked, self.fingerprint = [], {"data": tag}

    def epoch(self, e):
        self.asked.append(e)
        return _data(24, seed=10 + e)

    def validation(self):
        return _data(8, seed=1)


def test_fit_asks_each_epoch_once_and_a_resumed_run_only_the_rest(tmp_path):
    data = Recording()

    def stop(epoch, row):
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        training.fit(_model(), data, epochs=4, batch_size=8, seed=7, live_dir=tmp_path / "l", checkpoint_dir=tmp_path / "w",
                     on_epoch_end=stop)
    assert data.asked == [0, 1]
    resumed = Recording()
    training.fit(_model(), resumed, epochs=4, batch_size=8, seed=7, live_dir=tmp_path / "l", checkpoint_dir=tmp_path / "w",
                 resume=True)
    assert resumed.asked == [2, 3]


def test_checkpoint_of_other_data_is_not_resumed(tmp_path, capsys):
    training.fit(_model(), Recording("a"), epochs=2, batch_size=8, seed=7, live_dir=tmp_path / "l",
                 checkpoint_dir=tmp_path / "w", keep_checkpoint=True)
    other = Recording("b")
    with warned(capsys, "other settings"):
        training.fit(_model(), other, epochs=2, batch_size=8, seed=7, live_dir=tmp_path / "l",
                     checkpoint_dir=tmp_path / "w", resume=True)
    assert other.asked == [0, 1]


def test_stored_features_are_the_same_every_epoch_and_fingerprinted_by_content():
    train, val = _data(10), _data(4, seed=1)
    data = StoredFeatures(train, val)
    assert data.epoch(0) is train and data.epoch(7) is train and data.validation() is val
    changed = (train[0].copy(), train[1])
    changed[0][3, 2] += 1
    assert StoredFeatures(changed, val).fingerprint != data.fingerprint
    assert StoredFeatures((train[0].copy(), train[1].copy()), val).fingerprint == data.fingerprint


# ---------------------------------------------------------------- the best epoch kept, early stopping


def _overfit_data():
    # Validation labels 40% flipped: the validation loss falls for 2 epochs, then rises while the
    # training loss keeps falling. With _model() and seed 7 the best epoch is 2 of 8 (the tests check).
    xv, yv = _data(20, seed=1)
    yv = yv.copy()
    yv[:8] = 1 - yv[:8]
    return StoredFeatures(_data(60), (xv, yv))


def _fit(tmp_path, name, model=None, epochs=8, **kw):
    model = model if model is not None else _model()
    res = training.fit(model, _overfit_data(), epochs=epochs, batch_size=8, seed=7, live_dir=tmp_path / name, **kw)
    return model, res


def _val_scores(model):
    xv, yv = _overfit_data().validation()
    loss, acc = model.evaluate(xv, yv, batch_size=8, verbose=0)
    return loss, acc


def test_keep_best_ends_with_the_best_epochs_weights(tmp_path):
    model, res = _fit(tmp_path, "best")  # keep="best" is the default, as train.keep's
    hist = res["history"]
    assert res["best_epoch"] == 2 and len(hist) == 8 and res["kept_epoch"] == 2
    assert hist[-1]["val_loss"] > hist[1]["val_loss"] + 0.05  # the last epoch is clearly worse
    # The model's predictions reproduce the best epoch's logged validation figures, not the last one's.
    loss, acc = _val_scores(model)
    assert loss == pytest.approx(hist[1]["val_loss"], abs=1e-5)
    assert acc == pytest.approx(hist[1]["val_accuracy"], abs=1e-6)
    # ... and its weights are those of a run stopped after epoch 2.
    two, _ = _fit(tmp_path, "two", epochs=2)
    for a, b in zip(model.get_weights(), two.get_weights()):
        np.testing.assert_array_equal(a, b)
    again, _ = _fit(tmp_path, "again")  # deterministic
    for a, b in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_keep_last_ends_with_the_last_epochs_weights(tmp_path):
    model, res = _fit(tmp_path, "last", keep="last")
    hist = res["history"]
    assert res["best_epoch"] == 2 and res["kept_epoch"] == 8
    loss, acc = _val_scores(model)
    assert loss == pytest.approx(hist[-1]["val_loss"], abs=1e-5)
    assert acc == pytest.approx(hist[-1]["val_accuracy"], abs=1e-6)
    best, res_best = _fit(tmp_path, "best")
    assert res_best["history"] == hist  # keep changes what is kept, not the training
    assert any(not np.array_equal(a, b) for a, b in zip(model.get_weights(), best.get_weights()))


def test_patience_stops_after_that_many_epochs_without_a_new_best(tmp_path):
    model, res = _fit(tmp_path, "p", patience=3)
    assert res["best_epoch"] == 2 and res["epochs"] == 5 and res["kept_epoch"] == 2  # epochs 3, 4, 5: no new best
    lines = _tsv(tmp_path / "p", "val/loss").splitlines()[1:]
    assert [ln.split("\t")[0] for ln in lines] == ["1", "2", "3", "4", "5"]
    _, full = _fit(tmp_path, "full", keep="last")
    assert res["history"] == full["history"][:5]
    _, never = _fit(tmp_path, "never", patience=8)  # patience longer than the run: all epochs
    assert never["epochs"] == 8


def test_keep_and_patience_are_checked_with_params_yaml():
    from tlpipe.config import validate_params

    with pytest.raises(ConfigError, match="train.keep"):
        validate_params({"train": {"keep": "first"}})
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="train.patience"):
            validate_params({"train": {"patience": bad}})


@pytest.mark.parametrize("patience, stop_after", [(None, 1), (None, 4), (3, 4), (3, 5)])
def test_resume_with_keep_best_equals_an_uninterrupted_run(tmp_path, patience, stop_after):
    """Interrupted after epoch 1 (it is the best so far), 4 (the best, epoch 2, is in the checkpoint
    beside epoch 4's weights) or 5 (with patience 3: the epoch that ends the run, before fit stops)."""
    full_model, full = _fit(tmp_path, "full", patience=patience)
    work = tmp_path / "work"

    def stop(epoch, row):
        if epoch == stop_after:
            raise Interrupt

    with pytest.raises(Interrupt):
        _fit(tmp_path, "part", checkpoint_dir=work, patience=patience, on_epoch_end=stop)
    with np.load(work / f"epoch-{stop_after:04d}.npz") as ckpt:
        # the best epoch's weights ride in the same file as the last epoch's (one atomic write)
        assert any(k.startswith("b") for k in ckpt.files) == (stop_after > 2)
    resumed_model, resumed = _fit(tmp_path, "part", model=_model(seed=99), checkpoint_dir=work, resume=True,
                                  patience=patience)
    assert resumed["history"] == full["history"] and resumed["kept_epoch"] == 2
    for a, b in zip(full_model.get_weights(), resumed_model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for key in ("train/loss", "val/loss", "val/accuracy"):
        assert _tsv(tmp_path / "part", key) == _tsv(tmp_path / "full", key)
    assert not work.exists()


def test_checkpoint_of_other_keep_or_patience_is_not_resumed(tmp_path, capsys):
    work = tmp_path / "w"
    _fit(tmp_path, "l", epochs=3, checkpoint_dir=work, keep_checkpoint=True, keep="last")
    with warned(capsys, "other settings"):
        _, res = _fit(tmp_path, "l", epochs=3, checkpoint_dir=work, resume=True)  # keep="best" needs the best weights
    assert res["kept_epoch"] == 2
    _fit(tmp_path, "l", epochs=3, checkpoint_dir=work, keep_checkpoint=True)
    with warned(capsys, "other settings"):
        _fit(tmp_path, "l", epochs=3, checkpoint_dir=work, resume=True, patience=1)


def test_params_train_keep_and_patience():
    from tlpipe.config import validate_params

    t = validate_params({}).train
    assert (t.keep, t.patience) == ("best", None)
    t = validate_params({"train": {"keep": "last", "patience": 3}}).train
    assert (t.keep, t.patience) == ("last", 3)
    for key, bad in (("keep", "first"), ("patience", 0), ("patience", -2), ("patience", 2.5), ("patience", "3")):
        with pytest.raises(ConfigError, match=f"train.{key}"):
            validate_params({"train": {key: bad}})
