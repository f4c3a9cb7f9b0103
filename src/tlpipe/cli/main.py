"""`tlpipe <command>`: dispatches to the commands, importing only the one chosen."""

from __future__ import annotations

import sys

from tlpipe.cli import run_stage

COMMANDS: dict[str, tuple[str, str]] = {
    # name: ("module:function", help); imported only when chosen, so `tlpipe --help` stays quick.
    "augment-preview": ("tlpipe.cli.augment_preview:main", "write a PNG grid of an image and augmented versions"),
    "predict": ("tlpipe.cli.predict:main", "classify image files and folders with a saved model"),
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
