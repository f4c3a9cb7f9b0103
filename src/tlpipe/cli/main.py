"""`tlpipe <command>`: argparse subcommands, each command's module imported only when chosen.

Usage errors (no command, an unknown one, a command's bad arguments) print usage on stderr and exit
2, as argparse does; deliberate errors exit 1 (run_stage).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tlpipe import __version__
from tlpipe.cli import run_stage


# name: (its module in tlpipe.cli, help); imported only when chosen, and the command's own parser reads
# its arguments, so `tlpipe --help` stays quick.
COMMANDS = {
    "augment-preview": ("augment_preview", "write a PNG grid of an image and augmented versions"),
    "predict": ("predict", "classify image files and folders with a saved model"),
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tlpipe", description="tlpipe's commands; the pipeline itself runs with "
                                 "`dvc repro` (see README.md).")
    ap.add_argument("--version", action="version", version=f"tlpipe {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)  # its arguments, --help too, go to its own parser
    return ap


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # This parser reads up to the command's name; the rest is the command's (argparse's REMAINDER
    # would hand an option right after the name, `predict --model m`, back to this parser).
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    args = parser().parse_args(argv[:at + 1])
    command = importlib.import_module(f"tlpipe.cli.{COMMANDS[args.command][0]}")
    run_stage(lambda rest: command.main(rest, prog=f"tlpipe {args.command}"), argv[at + 1:])
