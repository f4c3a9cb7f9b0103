"""TensorFlow's intra-op thread pool, one fixed size on every machine, so that no stored number depends
on the core count.

oneDNN and Eigen cut a kernel's work by the size of TensorFlow's intra-op pool, and where the cuts
fall decides the order in which floating-point sums are taken: VGG16's block2 convolutions already
give other last bits on pools of 1 and 2 threads, and so did the view cache (float16) and every
trained model. The pool's size decides the bits, not the cores under it: a pool of 2 threads on one
core gives the bits of a pool of 2 on two cores (bench/threads.py checks both). So every process
that computes something the pipeline stores runs with INTRA_OP_THREADS, whatever the machine: the
stage scripts (run_stage's import hook, right after `import tensorflow`), the Ray engine's actors,
and, for code called from Python, `pretrained.build_base`, `saved.load_model` and the training loop,
which configure it themselves when TensorFlow has not started yet.

Why 4: it uses up to 4 cores of a bigger machine, where a Ray pool of several actors (one per 4
CPUs, features/engine.py) is the way to use more; on 2 cores the oversubscribed pool costs nothing
measurable (bench/threads.py prints the ratio). Changing it changes stored bytes: it is part of the
fingerprints, like the TensorFlow version.
"""

from __future__ import annotations

from tlpipe.runtime.log import log

INTRA_OP_THREADS = 4


def configure() -> None:
    """Set TensorFlow's intra-op pool to INTRA_OP_THREADS. Must run before TensorFlow's first op;
    later, TensorFlow refuses a change and this raises RuntimeError saying what to do."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(INTRA_OP_THREADS)
    except RuntimeError:
        raise RuntimeError(
            f"TensorFlow already runs with {current() or 'its default number of'} intra-op threads; tlpipe "
            f"computes with {INTRA_OP_THREADS} on every machine (so results do not depend on the core "
            f"count): call tlpipe.runtime.threads.configure() before TensorFlow's first op") from None


def current() -> int:
    """The intra-op pool size TensorFlow was given (0: its default, one thread per core)."""
    import tensorflow as tf

    return int(tf.config.threading.get_intra_op_parallelism_threads())


def ensure() -> bool:
    """configure() where TensorFlow has not started; where it has, with another pool size, say on
    stderr that the numbers will differ from the pipeline's in their last bits. True when fixed."""
    try:
        configure()
    except RuntimeError as exc:
        log.warning(str(exc))
        return False
    return True
