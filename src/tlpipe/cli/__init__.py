"""The command line: `run_stage` (the wrapper every stage script runs under), `main` (`tlpipe <command>`)
and the commands themselves (`predict`, `augment-preview`).

Importing this package changes nothing; `run_stage` (and so `tlpipe <command>`) first calls
`start()` (runtime/startup.py): Keras on TensorFlow, tlpipe's messages on stderr, TensorFlow's thread
pool and GPU memory set as soon as TensorFlow is imported.
"""

from __future__ import annotations

import sys
from typing import Callable

from tlpipe.runtime.startup import grow_gpu_memory, start  # noqa: F401 - the package's API
from tlpipe.runtime.errors import TlpipeError


def positive_int(text: str) -> int:
    """argparse type: a positive integer, else a usage error (exit 2) naming the option."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {text})")
    return value


def run_stage(main: Callable[..., object], argv: list[str] | None = None) -> None:
    """start(), then the stage's main(); a deliberate TlpipeError becomes one clear line and exit status 1."""
    try:
        start()
        main(argv)
    except TlpipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
