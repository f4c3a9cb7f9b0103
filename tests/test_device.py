"""compute.device: which processor computes is a param DVC records (a GPU's kernels give other bits
than a CPU's); cpu hides the GPUs from TensorFlow, gpu needs one, every computing stage applies it."""

from __future__ import annotations

import copy

import pytest
import yaml
from helpers import REPO, sh, stage_cmd, user_lines, write_params

from tlpipe import device
from tlpipe.config import validate_params
from tlpipe.runtime.errors import ConfigError
from tlpipe.features import engine as engines


class FakeConfig:
    """tf.config's device calls, with `gpus` physical GPUs; records what was hidden."""

    def __init__(self, gpus: int):
        self.gpus, self.hidden = [f"GPU:{i}" for i in range(gpus)], None

    def list_physical_devices(self, kind):
        return list(self.gpus) if kind == "GPU" else ["CPU:0"]

    def set_visible_devices(self, devices, kind):
        self.hidden = (list(devices), kind)


@pytest.fixture
def fake_tf(monkeypatch):
    import tensorflow as tf

    def make(gpus: int) -> FakeConfig:
        fake = FakeConfig(gpus)
        monkeypatch.setattr(tf.config, "list_physical_devices", fake.list_physical_devices)
        monkeypatch.setattr(tf.config, "set_visible_devices", fake.set_visible_devices)
        return fake

    return make


def test_cpu_hides_every_gpu_and_gpu_keeps_them(fake_tf):
    fake = fake_tf(2)
    device.use("cpu")
    assert fake.hidden == ([], "GPU")
    fake = fake_tf(2)
    device.use("gpu")
    assert fake.hidden is None


def test_gpu_without_one_is_a_clear_error(fake_tf):
    fake_tf(0)
    with pytest.raises(ConfigError, match="compute.device: gpu, but TensorFlow sees no GPU.*compute.device: cpu"):
        device.use("gpu")


def test_the_param_is_cpu_or_gpu_and_float16_needs_the_gpu():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert validate_params(raw).compute.device == "cpu"
    bad = copy.deepcopy(raw)
    bad["compute"]["device"] = "tpu"
    with pytest.raises(ConfigError, match="compute.device"):
        validate_params(bad)
    bad["compute"].update(device="cpu", precision="mixed_float16")
    with pytest.raises(ConfigError, match="mixed_float16 computes on a GPU; set compute.device: gpu"):
        validate_params(bad)
    bad["compute"]["device"] = "gpu"
    assert validate_params(bad).compute.precision == "mixed_float16"


def test_ray_actors_take_the_cards_only_for_gpu():
    cluster = {"CPU": 8.0, "GPU": 2.0}
    assert engines.pool_shape(engines.Engine("ray", device="gpu"), 10, cluster) == (2, 4.0, 1.0)
    assert engines.pool_shape(engines.Engine("ray", device="cpu"), 10, cluster) == (2, 4.0, 0.0)


@pytest.mark.parametrize("stage", ["extract", "train_head"])
def test_a_stage_on_gpu_without_one_stops_before_any_work(tmp_path, stage):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    write_params(tmp_path, {"compute": {"device": "gpu"}})
    proc = sh(stage_cmd(stage), tmp_path, check=False)
    assert proc.returncode == 1
    assert user_lines(proc.stderr)[-1].startswith("error: compute.device: gpu, but TensorFlow sees no GPU")
    assert not (tmp_path / "features").exists() and not (tmp_path / "models").exists()
