"""What a stage or a `tlpipe` command sets up when it starts (`start()`, called by run_stage), and
never on import: a notebook importing tlpipe keeps its own stderr, logging and import machinery.

- Keras on TensorFlow: KERAS_BACKEND=tensorflow before keras is imported, whatever ~/.keras/keras.json
  says (tlpipe's layers, kernels and stored bytes are TensorFlow's); a keras already running another
  backend is a clear error.
- tlpipe's messages on stderr at TLPIPE_LOG_LEVEL (tlpipe.runtime.log).
- TensorFlow, when something imports it: its intra-op pool fixed at tlpipe.runtime.threads.INTRA_OP_THREADS
  (so no stored number depends on the core count), memory growth on for every GPU it sees
  (TensorFlow otherwise reserves nearly all of each card's memory), and its start-up lines (oneDNN
  notes, CUDA stubs, "failed call to cuInit" on a machine without a GPU) kept from the user, who
  sees only tlpipe's own messages; TLPIPE_VERBOSE=1 (or TF_CPP_MIN_LOG_LEVEL 0 or 1) shows them.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys
import tempfile

from tlpipe.runtime import threads
from tlpipe.runtime.errors import ConfigError
from tlpipe.runtime.log import log
from tlpipe.runtime.log import setup as setup_logging

BACKEND = "tensorflow"


class _TensorFlowImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs `import tensorflow`, then fixes its thread pool (tlpipe.runtime.threads) and `grow_gpu_memory`, before
    TensorFlow's first op.

    quiet: file descriptor 2 points at a temp file meanwhile. TensorFlow's C++ libraries log while
    they load, before absl reads TF_CPP_MIN_LOG_LEVEL, straight to fd 2 (TF 2.21): no setting
    silences that. If the import fails, what it wrote is shown after all.
    """

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self._busy = False
        self._loader = None

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(name)  # the finders after this one
        finally:
            self._busy = False
        if spec is not None and spec.loader is not None:
            self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self._loader  # as if imported plainly
        with _stderr_to_temp() if self.quiet else contextlib.nullcontext():
            self._loader.exec_module(module)
            threads.configure()
            grow_gpu_memory(module)  # lists the GPUs: CUDA's lines, hidden too


@contextlib.contextmanager
def _stderr_to_temp():
    """File descriptor 2 to a temp file; its content replayed on stderr if the block fails."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def grow_gpu_memory(tf) -> None:
    """Memory growth on for every GPU `tf` (the tensorflow module) sees: without it TensorFlow takes
    nearly all of each card's memory at its first op. Must run before TensorFlow initialises its
    devices, hence right after the import."""
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)


def setup_tensorflow() -> None:
    """Install the import hook (once), quiet unless TLPIPE_VERBOSE or a low TF_CPP_MIN_LOG_LEVEL asks
    for TensorFlow's start-up lines."""
    quiet = not (os.environ.get("TLPIPE_VERBOSE", "0") not in ("", "0")
                 or os.environ.get("TF_CPP_MIN_LOG_LEVEL") in ("0", "1"))
    if quiet:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # later lines, e.g. cuInit's at the first op
    tf = sys.modules.get("tensorflow")
    if tf is not None:  # imported before start(): set what can still be set
        threads.ensure()
        with contextlib.suppress(RuntimeError):  # devices already initialised
            grow_gpu_memory(tf)
    elif not any(isinstance(f, _TensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _TensorFlowImport(quiet))


def use_tensorflow_backend() -> None:
    """KERAS_BACKEND=tensorflow for the keras this process will import; ConfigError when keras is
    already imported with another backend (say, in a notebook whose keras.json names jax)."""
    keras = sys.modules.get("keras")
    if keras is None:
        was = os.environ.get("KERAS_BACKEND")
        os.environ["KERAS_BACKEND"] = BACKEND
        if was not in (None, "", BACKEND):
            log.debug(f"KERAS_BACKEND={was} replaced by {BACKEND}: tlpipe computes with TensorFlow")
        return
    running = keras.backend.backend()
    if running != BACKEND:
        raise ConfigError(f"keras runs on the {running} backend (KERAS_BACKEND or ~/.keras/keras.json); tlpipe "
                          f"needs {BACKEND}: set KERAS_BACKEND={BACKEND} before keras is imported (or start "
                          f"with tlpipe.cli.start())")


def start() -> None:
    """Everything a stage or command needs before its first line of work (idempotent)."""
    use_tensorflow_backend()
    setup_logging()
    setup_tensorflow()
