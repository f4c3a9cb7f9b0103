"""compute.device: the kind of processor that computes, named in params.yaml so that DVC records it.

A GPU's kernels give other last bits than a CPU's, so outputs computed on one must never pass for the
other's (the run cache, `dvc pull`). `cpu` (the default) hides every GPU from TensorFlow, so a machine
with a card still computes what a CPU-only teammate computes; `gpu` computes on the GPUs and stops
with a clear error where TensorFlow sees none. Applied before TensorFlow's first op: each computing
stage calls `use` right after reading its params, and each Ray actor before building its worker.
"""

from __future__ import annotations

from tlpipe.runtime.errors import ConfigError


def use(device: str) -> None:
    """Make TensorFlow compute on `device` (compute.device, validated by config: cpu or gpu) here."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if device == "gpu":
        if not gpus:
            raise ConfigError("compute.device: gpu, but TensorFlow sees no GPU on this machine (a CUDA build "
                              "of TensorFlow and a driver are needed); set compute.device: cpu")
        return
    if gpus:
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TensorFlow already started, with the GPUs
            raise RuntimeError("compute.device: cpu must hide the GPUs before TensorFlow's first op; call "
                               "tlpipe.device.use() first") from None
