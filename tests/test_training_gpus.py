"""Training on every device of a node (compute.strategy), GPU memory growth, mixed_float16: what can be
checked without a GPU (docs/training_gpus.md says what cannot)."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from helpers import REPO, tool_env

from tlpipe.runtime.errors import ConfigError

# compute.strategy mirrored against default on two logical CPUs. Measured on this 2-core machine: the
# losses differ by at most 3e-7 relative (float32 sums of the replicas' halves added in another order),
# the accuracies not at all. The margin (30x) covers other CPUs' kernels; a real difference in how the
# batch is split (each replica stepping alone, a gradient counted twice) moves losses by 1e-2 or more.
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def two_cpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_cpus")
    env = tool_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "two_cpus.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text()), proc.stderr


def test_mirrored_runs_on_both_logical_cpus_and_auto_stays_on_one(two_cpus):
    result, stderr = two_cpus
    assert result["mirrored"]["replicas"] == 2
    assert result["default"]["replicas"] == 1
    assert result["auto"]["replicas"] == 1  # auto mirrors over GPUs only; there are none
    assert "MirroredStrategy (2 replicas)" in stderr and "global batch 8, 4 per replica" in stderr


@pytest.mark.parametrize("stage", ["head", "finetune"])
def test_mirrored_gives_the_metrics_of_one_device(two_cpus, stage):
    result, _ = two_cpus
    one, two = result["default"][stage], result["mirrored"][stage]
    assert len(one) == len(two) > 1
    n_val = {"head": 16, "finetune": 4}[stage]
    for a, b in zip(one, two):
        for key in ("train_loss", "val_loss"):
            assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL), (stage, a["epoch"], key)
        assert b["val_accuracy"] == pytest.approx(a["val_accuracy"], abs=0.5 / n_val), (stage, a["epoch"])
    # The runs learned something: the comparison is not between two untouched models.
    assert one[-1]["train_loss"] != one[0]["train_loss"]


def test_a_resumed_mirrored_run_equals_an_uninterrupted_one(two_cpus):
    # The checkpoint restores mirrored variables and the optimizer's state: bit for bit, as on one device.
    result, stderr = two_cpus
    assert "resuming after epoch 2" in stderr
    assert result["mirrored"]["head_resumed"] == result["mirrored"]["head"]


def test_auto_and_default_are_the_default_strategy_on_one_device():
    import tensorflow as tf

    from tlpipe.train.strategy import training_strategy

    if len(tf.config.list_logical_devices("GPU")) > 1:
        pytest.skip("more than one GPU: auto mirrors here")
    for name in ("auto", "default"):
        strategy = training_strategy(name, batch_size=20)
        assert strategy is tf.distribute.get_strategy() and strategy.num_replicas_in_sync == 1


def test_unknown_strategy_names_the_key():
    from tlpipe.train.strategy import training_strategy

    with pytest.raises(ConfigError, match=r"compute.strategy: .*auto, default, mirrored"):
        training_strategy("parallel")


def test_memory_growth_is_set_for_every_gpu():
    from tlpipe.cli import grow_gpu_memory

    calls = []
    gpus = ["gpu0", "gpu1"]
    experimental = SimpleNamespace(set_memory_growth=lambda d, on: calls.append((d, on)))
    fake_tf = SimpleNamespace(config=SimpleNamespace(
        list_physical_devices=lambda kind: gpus if kind == "GPU" else [], experimental=experimental))
    grow_gpu_memory(fake_tf)
    assert calls == [("gpu0", True), ("gpu1", True)]


@pytest.mark.parametrize("verbose", ["0", "1"])
def test_importing_tensorflow_after_tlpipe_cli_sets_memory_growth_first(verbose):
    # In a fresh process, as a stage: tlpipe.cli's start(), then whatever imports tensorflow. The hook hands
    # grow_gpu_memory the tensorflow module before its devices exist: a device setting still takes
    # (set_logical_device_configuration raises RuntimeError once they are initialised).
    code = ("import tlpipe.runtime.startup as cli\n"
            "cli.start()\n"
            "def split_cpu(tf):\n"
            "    cpu = tf.config.list_physical_devices('CPU')[0]\n"
            "    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
            "cli.grow_gpu_memory = split_cpu\n"
            "import keras\n"
            "import tensorflow as tf\n"
            "print(len(tf.config.list_logical_devices('CPU')))\n")
    env = {**tool_env(), "TLPIPE_VERBOSE": verbose, "PYTHONPATH": str(REPO / "src")}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "2", proc.stderr[-2000:]


def test_mixed_float16_without_a_gpu_stops_naming_the_key_and_the_choices():
    import tensorflow as tf

    from tlpipe.features.backbones import dtype_policy

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is visible: mixed_float16 is allowed here")
    with pytest.raises(ConfigError, match=r"compute.precision: mixed_float16 needs a GPU.*float32.*bfloat16"):
        with dtype_policy("mixed_float16"):
            pass


def test_mixed_float16_stops_train_head_aug_before_any_work(tmp_path):
    import tensorflow as tf

    from tlpipe.config import validate_params
    from tlpipe.train.head_aug import run_head_aug
    from tlpipe.train.settings import TrainSettings

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is visible: mixed_float16 is allowed here")
    split = tmp_path / "split"
    split.mkdir()
    (split / "classes.json").write_text(json.dumps({"classes": ["cat", "dog"]}))
    p = validate_params({"backbone": {"weights": "none", "image_size": 32, "layer": "block5_pool", "pooling": "flatten"},
                         "compute": {"precision": "mixed_float16", "device": "gpu"}, "head": {"standardize": False}})
    with pytest.raises(ConfigError, match="compute.precision: mixed_float16"):
        run_head_aug(cache=tmp_path / "views.h5", split_dir=split, images_dir=tmp_path,
                     model_out=tmp_path / "m.keras", metrics_out=tmp_path / "m.json", live_dir=tmp_path / "live",
                     backbone=p.backbone, compute=p.compute, head=p.head, run=TrainSettings.from_params(p.head_aug),
                     augment=p.augment)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["split"]  # nothing written


def test_under_mixed_float16_the_head_outputs_float32_and_the_loss_is_scaled():
    import keras

    from tlpipe.model.dense_head import build_head
    from tlpipe.train.compile import compile_classifier

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")  # the policy dtype_policy sets on a GPU
    try:
        heads = {n: build_head(12, n, units=4) for n in (2, 3)}
    finally:
        keras.mixed_precision.set_global_policy(previous)
    for n, head in heads.items():
        assert head.get_layer("head_dense").compute_dtype == "float16"
        assert head.get_layer("head_out").compute_dtype == "float32"  # sigmoid / softmax in float32
        assert head(keras.ops.ones((2, 12))).dtype == "float32"
        compile_classifier(head, n, 1e-3)
        assert isinstance(head.optimizer, keras.optimizers.LossScaleOptimizer)
    plain = compile_classifier(build_head(12, 2, units=4), 2, 1e-3)
    assert not isinstance(plain.optimizer, keras.optimizers.LossScaleOptimizer)
