"""Every command the README and docs/ show stays runnable as written.

Parses the shell blocks of README.md and docs/*.md (``` fences, `$ ` prompts included) and, for each
`dvc ...`, `tlpipe ...`, `python bench/...` and `python stages/...` command:
  - the script it names exists;
  - each option it passes exists in that command's parser (DVC's own argparse tree for dvc subcommands;
    `--help` of the bench and stage scripts and of `tlpipe <subcommand>`);
  - each `-S key=value` names a key of params.yaml (a key inside a mapping-valued param, such as
    data.split.train, counts).
Nothing is run but `--help`, so this is fast.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([a-z]*)\s*\n(.*?)^```", re.S | re.M)


def shell_commands(text: str) -> list[str]:
    """Commands of the doc's shell blocks (```bash, ```sh, plain ```), one per `&&`/`;`/`|` segment."""
    out = []
    for lang, body in FENCE.findall(text):
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        lines = body.replace("\\\n", " ").splitlines()
        prompted = any(line.startswith("$ ") for line in lines)
        for line in lines:
            if prompted:
                if not line.startswith("$ "):
                    continue  # printed output
                line = line[2:]
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue  # not a shell line (output, a table)
            segment: list[str] = []
            for w in [*words, "&&"]:
                if w in ("&&", "||", ";", "|"):
                    if segment:
                        out.append(segment)
                    segment = []
                else:
                    segment.append(w)
    return [c for c in out if c[0] in ("dvc", "tlpipe") or (c[0] == "python" and len(c) > 1
                                                                and c[1].startswith(("bench/", "stages/")))]


def documented() -> list[tuple[str, list[str]]]:
    return [(doc.relative_to(ROOT).as_posix(), cmd) for doc in DOCS for cmd in shell_commands(doc.read_text())]


COMMANDS = documented()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 20
    assert any(c[:3] == ["dvc", "exp", "run"] for _, c in COMMANDS)
    assert any(c[0] == "python" and c[1].startswith("bench/") for _, c in COMMANDS)


@functools.cache
def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def is_param(key: str) -> bool:
    node = params()
    for part in key.split("."):
        if not isinstance(node, dict):
            return False
        if part not in node:
            return False
        node = node[part]
        if isinstance(node, dict) and not node:
            return True
    return True


def set_params(cmd: list[str]) -> list[str]:
    keys = []
    for i, w in enumerate(cmd):
        if w in ("-S", "--set-param", "--set") and i + 1 < len(cmd):
            keys.append(cmd[i + 1].split("=", 1)[0])
        elif w.startswith("--set-param="):
            keys.append(w.split("=", 2)[1])
    return keys


def options(cmd: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in cmd if w.startswith("-") and w != "-" and not re.fullmatch(r"-\d.*", w)]


@functools.cache
def dvc_parser():
    from dvc.cli.parser import get_main_parser

    return get_main_parser()


def dvc_subparser(words: list[str]):
    """The deepest DVC parser the words name (dvc exp run -> exp's run parser) and the words it took."""
    parser, taken = dvc_parser(), 0
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or taken >= len(words) or words[taken] not in subs[0].choices:
            return parser, taken
        parser, taken = subs[0].choices[words[taken]], taken + 1


@functools.cache
def help_options(*argv: str) -> frozenset[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"{' '.join(argv)} --help failed:\n{proc.stderr[-2000:]}"
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", proc.stdout))


@pytest.mark.parametrize("doc,cmd", COMMANDS, ids=[f"{d}: {' '.join(c)[:70]}" for d, c in COMMANDS])
def test_documented_command(doc, cmd):
    text = " ".join(cmd)
    for key in set_params(cmd):
        if cmd[0] == "python" and cmd[1] == "bench/results.py" or cmd[0] == "dvc" or cmd[1:2] == ["bench/grid.py"]:
            assert is_param(key), f"{doc}: `{text}` sets {key}, which params.yaml does not have"
    if cmd[0] == "dvc":
        parser, taken = dvc_subparser(cmd[1:])
        assert taken, f"{doc}: `{text}`: no such dvc command"
        known = set(parser._option_string_actions)
        unknown = [o for o in options(cmd[1 + taken:]) if o not in known]
        assert not unknown, f"{doc}: `{text}`: dvc {' '.join(cmd[1:1 + taken])} has no {', '.join(unknown)}"
    elif cmd[0] == "tlpipe":
        assert len(cmd) > 1, f"{doc}: `{text}`: which tlpipe command?"
        known = help_options("-c", "from tlpipe.cli.main import main; main()", cmd[1])
        unknown = [o for o in options(cmd[2:]) if o not in known]
        assert not unknown, f"{doc}: `{text}`: tlpipe {cmd[1]} has no {', '.join(unknown)}"
    else:
        script = ROOT / cmd[1]
        assert script.is_file(), f"{doc}: `{text}`: {cmd[1]} does not exist"
        known = help_options(cmd[1])
        unknown = [o for o in options(cmd[2:]) if o not in known]
        assert not unknown, f"{doc}: `{text}`: {cmd[1]} has no {', '.join(unknown)}"
