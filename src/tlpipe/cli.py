"""Command-line entry points: `tlpipe <command>` and the wrapper every stage script runs under."""

from __future__ import annotations

import os
import sys
from typing import Callable

from .errors import TlpipeError

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


COMMANDS: dict[str, tuple[str, str]] = {
    # name: ("module:function", help); imported only when chosen, so `tlpipe --help` stays quick.
    "augment-preview": ("tlpipe.augment:preview_main", "write a PNG grid of an image and augmented versions"),
    "predict": ("tlpipe.commands.predict:main", "classify image files and folders with a saved model"),
}


def main(argv: list[str] | None = None) -> None:
    import importlib
    import inspect

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: tlpipe <command> [args]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<16} {text}")
        print("\nThe pipeline itself runs with `dvc repro`; see README.md.")
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module_name, func = COMMANDS[name][0].split(":")
    entry = getattr(importlib.import_module(module_name), func)
    takes_prog = "prog" in inspect.signature(entry).parameters
    run_stage(lambda args: entry(args, prog=f"tlpipe {name}") if takes_prog else entry(args), rest)
