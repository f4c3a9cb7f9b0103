"""The command line: `run_stage` (the wrapper every stage script runs under), `main` (`tlpipe <command>`)
and the commands themselves (`predict`)."""

from __future__ import annotations

import os
import sys
from typing import Callable

from tlpipe.errors import TlpipeError

# TensorFlow's C++ start-up chatter hides our own messages; users can still set it lower.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run_stage(main: Callable[..., object], argv: list[str] | None = None) -> None:
    """Run a stage's main(); a deliberate TlpipeError becomes one clear line and exit status 1."""
    try:
        main(argv)
    except TlpipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
