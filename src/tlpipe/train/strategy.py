"""The tf.distribute strategy a training stage runs under (compute.strategy), see docs/training_gpus.md.

- auto: MirroredStrategy over the GPUs when TensorFlow sees more than one, else the default strategy.
- mirrored: MirroredStrategy over every visible device of the best kind: the GPUs, else the logical
  CPU devices (one unless the process split the CPU, as the tests do).
- default: TensorFlow's default strategy (one device), whatever the machine has.

The batch size of the params (head.batch_size, ...) stays the global batch: Keras splits each batch
across the replicas, so a replica sees batch_size / replicas samples per step and the optimizer one
update per global batch, as on one device.
"""

from __future__ import annotations

import functools

from tlpipe.config.choices import STRATEGIES
from tlpipe.runtime.errors import ConfigError
from tlpipe.runtime.log import log


def training_strategy(name: str, batch_size: int | None = None):
    """The tf.distribute.Strategy for compute.strategy `name`; build (or load) and compile models in
    its scope(). A mirrored one is announced on stderr, with the per-replica share of `batch_size`."""
    import tensorflow as tf

    if name not in STRATEGIES:
        raise ConfigError(f"compute.strategy: must be one of {', '.join(STRATEGIES)}, got {name!r}")
    gpus = tf.config.list_logical_devices("GPU")
    if name == "default" or (name == "auto" and len(gpus) < 2):
        return tf.distribute.get_strategy()
    devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
    strategy = _mirrored(tuple(devices))
    share = ""
    if batch_size:
        low, high = batch_size // len(devices), -(-batch_size // len(devices))
        share = f"; global batch {batch_size}, {low if low == high else f'{low}-{high}'} per replica"
    log.info(f"compute.strategy {name}: {describe(strategy)} on {', '.join(devices)}{share}")
    return strategy


@functools.cache
def _mirrored(devices: tuple[str, ...]):
    # One per process: two MirroredStrategy objects number their collective ops alike, so the second
    # one's gradient all-reduce can meet the first one's (seen here: "Shape mismatch in the collective
    # instance" when finetune followed train_head_aug in one process).
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(list(devices))


def describe(strategy) -> str:
    """One line for the log: which strategy, how many replicas."""
    n = int(strategy.num_replicas_in_sync)
    return f"{type(strategy).__name__} ({n} replica{'s' if n != 1 else ''})"
