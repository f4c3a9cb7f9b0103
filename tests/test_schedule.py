"""The learning rate per epoch (head_aug.schedule, finetune.schedule): its values, fit applying them,
and a resumed cosine run equal to an uninterrupted one."""

import math

import numpy as np
import pytest

from tlpipe.runtime.errors import ConfigError
from tlpipe.train import loop as training
from tlpipe.train.compile import learning_rates
from test_training import Interrupt, _model, _stored


def test_constant_is_the_rate_every_epoch():
    assert learning_rates(3e-5, 4, "constant") == [3e-5] * 4


def test_cosine_starts_at_the_rate_and_falls_to_near_zero():
    rates = learning_rates(1e-4, 10, "cosine")
    assert len(rates) == 10 and rates[0] == pytest.approx(1e-4)
    assert all(a > b > 0 for a, b in zip(rates, rates[1:]))
    assert rates[5] == pytest.approx(0.5e-4)  # half way: half the rate
    assert rates[-1] == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert learning_rates(1e-4, 1, "cosine") == [pytest.approx(1e-4)]


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="schedule.*constant, cosine.*'linear'"):
        learning_rates(1e-4, 3, "linear")


class RecordRate:
    """on_epoch_end: the optimizer's learning rate each epoch trained with."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def __call__(self, epoch, row):
        self.seen.append(float(np.asarray(self.model.optimizer.learning_rate)))


def test_fit_trains_each_epoch_at_its_rate(tmp_path):
    model = _model()
    rates = learning_rates(1e-2, 4, "cosine")
    record = RecordRate(model)
    training.fit(model, _stored(40, 10), epochs=4, batch_size=8, seed=7, live_dir=tmp_path / "l",
                 learning_rates=rates, on_epoch_end=record)
    assert record.seen == pytest.approx(rates, rel=1e-6)
    # The rates change the training: a constant rate gives other weights.
    other = _model()
    training.fit(other, _stored(40, 10), epochs=4, batch_size=8, seed=7, live_dir=tmp_path / "c")
    assert any(not np.array_equal(a, b) for a, b in zip(model.get_weights(), other.get_weights()))


def test_rates_must_match_the_epochs(tmp_path):
    with pytest.raises(ValueError, match="2 rates for 3 epochs"):
        training.fit(_model(), _stored(20, 10), epochs=3, batch_size=8, seed=7, live_dir=tmp_path / "l",
                     learning_rates=[1e-3, 1e-3])


def test_a_resumed_cosine_run_equals_an_uninterrupted_one(tmp_path):
    data, rates = _stored(60, 20), learning_rates(1e-2, 5, "cosine")
    full_model = _model()
    full = training.fit(full_model, data, epochs=5, batch_size=8, seed=7, live_dir=tmp_path / "full",
                        learning_rates=rates)

    def stop(epoch, row):
        if epoch == 3:
            raise Interrupt

    work = tmp_path / "work"
    with pytest.raises(Interrupt):
        training.fit(_model(), data, epochs=5, batch_size=8, seed=7, live_dir=tmp_path / "part", checkpoint_dir=work,
                     learning_rates=rates, on_epoch_end=stop)
    resumed_model = _model(seed=99)
    resumed = training.fit(resumed_model, data, epochs=5, batch_size=8, seed=7, live_dir=tmp_path / "part",
                           checkpoint_dir=work, resume=True, learning_rates=rates)
    assert resumed["history"] == full["history"]
    for a, b in zip(full_model.get_weights(), resumed_model.get_weights()):
        np.testing.assert_array_equal(a, b)


class FakeOptimizer:
    learning_rate = None


class FakeModel:
    optimizer = FakeOptimizer()


def test_warmup_rises_linearly_over_its_steps_across_epochs_then_holds():
    from tlpipe.train.callbacks import Warmup

    seen = []
    for epoch, first in enumerate((0, 4, 8)):  # 4 steps an epoch, a warm-up of 6 steps
        warm = Warmup(6, 1e-2, first)
        warm.set_model(FakeModel())
        for batch in range(4):
            warm.on_train_batch_begin(batch)
            seen.append(FakeModel.optimizer.learning_rate)
    assert seen[:6] == pytest.approx([1e-2 * k / 6 for k in range(1, 7)])
    assert seen[6] == pytest.approx(1e-2)  # step 6 sets the rate itself; later steps leave it
    assert seen[7:] == [seen[6]] * 5


def test_fit_with_a_warmup_trains_otherwise_and_resumes_as_an_uninterrupted_run(tmp_path):
    # 60 rows in batches of 8: 8 steps an epoch; a warm-up of 12 steps spans two epochs.
    data = _stored(60, 20)
    plain_model, warm_model = _model(), _model()
    training.fit(plain_model, data, epochs=4, batch_size=8, seed=7, live_dir=None, lr=1e-2, schedule="constant")
    full = training.fit(warm_model, data, epochs=4, batch_size=8, seed=7, live_dir=None, lr=1e-2,
                        schedule="constant", warmup_steps=12)
    assert any(not np.array_equal(a, b) for a, b in zip(plain_model.get_weights(), warm_model.get_weights()))
    assert float(np.asarray(warm_model.optimizer.learning_rate)) == pytest.approx(1e-2)  # after the warm-up

    def stop(epoch, row):
        if epoch == 1:  # in the middle of the warm-up
            raise Interrupt

    work = tmp_path / "work"
    with pytest.raises(Interrupt):
        training.fit(_model(), data, epochs=4, batch_size=8, seed=7, live_dir=None, checkpoint_dir=work, lr=1e-2,
                     schedule="constant", warmup_steps=12, on_epoch_end=stop)
    resumed_model = _model(seed=99)
    resumed = training.fit(resumed_model, data, epochs=4, batch_size=8, seed=7, live_dir=None, checkpoint_dir=work,
                           resume=True, lr=1e-2, schedule="constant", warmup_steps=12)
    assert resumed["history"] == full["history"]
    for a, b in zip(warm_model.get_weights(), resumed_model.get_weights()):
        np.testing.assert_array_equal(a, b)
