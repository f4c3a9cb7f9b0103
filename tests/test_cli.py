"""Start-up and the command line: nothing happens on import, run_stage sets Keras, logging and TensorFlow
up, `tlpipe` reports usage errors on stderr with exit 2, and nothing but predict's CSV goes to stdout."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from helpers import BIN, REPO, tool_env


def python(code: str, env_extra: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {**tool_env(), "PYTHONPATH": str(REPO / "src"), **(env_extra or {})}
    for key, value in list(env.items()):
        if value is None:
            del env[key]
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          **kwargs)


def tlpipe(*args: str) -> subprocess.CompletedProcess:
    env = {**tool_env(), "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([str(BIN / "tlpipe"), *args], env=env, capture_output=True, text=True, timeout=300)


def test_importing_the_package_changes_nothing():
    # A notebook importing tlpipe keeps its import machinery, its stderr and its Keras backend.
    code = ("import os, sys\n"
            "hooks = list(sys.meta_path)\n"
            "import tlpipe.cli, tlpipe.cli.main, tlpipe.cli.predict, tlpipe.config\n"
            "print(sys.meta_path == hooks, 'KERAS_BACKEND' in os.environ, 'tensorflow' in sys.modules)\n")
    proc = python(code, {"KERAS_BACKEND": None})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False", "False"]


def test_a_stage_runs_on_tensorflow_whatever_keras_json_says(tmp_path):
    (tmp_path / ".keras").mkdir()
    (tmp_path / ".keras" / "keras.json").write_text(json.dumps({"backend": "jax"}))
    code = ("from tlpipe.cli import run_stage\n"
            "def main(argv):\n"
            "    import keras\n"
            "    from tlpipe.runtime import threads\n"
            "    print(keras.backend.backend(), threads.current())\n"
            "run_stage(main)\n")
    proc = python(code, {"HOME": str(tmp_path), "KERAS_HOME": None, "KERAS_BACKEND": "jax"})
    assert proc.returncode == 0, proc.stderr
    from tlpipe.runtime.threads import INTRA_OP_THREADS

    assert proc.stdout.split() == ["tensorflow", str(INTRA_OP_THREADS)]  # and the pool fixed on import


def test_keras_already_on_another_backend_is_a_clear_error():
    # A notebook that imported keras on jax first (here a stand-in: jax is not installed).
    code = ("import sys, types\n"
            "sys.modules['keras'] = types.SimpleNamespace(backend=types.SimpleNamespace(backend=lambda: 'jax'))\n"
            "from tlpipe.cli import run_stage\n"
            "run_stage(lambda argv: print('ran'))\n")
    proc = python(code)
    assert proc.returncode == 1 and "ran" not in proc.stdout
    assert proc.stderr.startswith("error: keras runs on the jax backend") and "KERAS_BACKEND=tensorflow" in proc.stderr


@pytest.mark.parametrize("level, shown", [("", ["note: a note", "warning: a warning"]),
                                          ("WARNING", ["warning: a warning"]),
                                          ("debug", ["debug: a detail", "note: a note", "warning: a warning"])])
def test_the_log_level_comes_from_the_environment(level, shown):
    code = ("from tlpipe.cli import run_stage\n"
            "from tlpipe.runtime.log import log\n"
            "def main(argv):\n"
            "    log.debug('a detail'); log.info('a note'); log.warning('a warning')\n"
            "run_stage(main)\n")
    proc = python(code, {"TLPIPE_LOG_LEVEL": level})
    assert proc.returncode == 0 and proc.stdout == ""
    assert proc.stderr.splitlines() == shown


def test_a_bad_log_level_names_the_variable():
    proc = python("from tlpipe.cli import run_stage\nrun_stage(lambda argv: None)\n", {"TLPIPE_LOG_LEVEL": "loud"})
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: TLPIPE_LOG_LEVEL='loud': choose one of debug, info, warning, error")


def test_progress_bars_only_on_a_terminal_unless_the_environment_says(capsys, monkeypatch):
    from tlpipe.runtime import log
    from tlpipe.runtime.log import progress

    monkeypatch.delenv("TLPIPE_PROGRESS", raising=False)
    assert progress(range(3)).disable  # pytest's captured stderr is not a terminal
    assert progress(range(3), disable=True).disable
    monkeypatch.setattr(log, "_stderr_is_terminal", lambda: True)
    assert not progress(range(3)).disable
    monkeypatch.setenv("TLPIPE_PROGRESS", "0")
    assert progress(range(3)).disable
    monkeypatch.setattr(log, "_stderr_is_terminal", lambda: False)
    monkeypatch.setenv("TLPIPE_PROGRESS", "1")
    assert not progress(range(3)).disable
    assert progress(range(3), disable=True).disable


def test_tlpipe_without_a_command_is_a_usage_error():
    proc = tlpipe()
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("usage: tlpipe") and "COMMAND" in proc.stderr


def test_tlpipe_unknown_command_and_version():
    proc = tlpipe("train")
    assert proc.returncode == 2 and proc.stdout == "" and "invalid choice: 'train'" in proc.stderr
    import tlpipe as package

    proc = tlpipe("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"tlpipe {package.__version__}"


@pytest.mark.parametrize("args, says", [([], "the following arguments are required: PATH"),
                                        (["--batch-size", "0", "."], "--batch-size: must be a positive integer"),
                                        (["--evaluate", "a", "b"], "--evaluate takes exactly one folder")])
def test_predict_misuse_is_a_usage_error(args, says):
    proc = tlpipe("predict", *args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("usage: tlpipe predict") and says in proc.stderr


def test_command_help_is_the_commands_own():
    proc = tlpipe("augment-preview", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: tlpipe augment-preview")


def test_only_predicts_csv_goes_to_stdout():
    # Stages and commands talk on stderr: stdout stays clean for data (`tlpipe predict > preds.csv`).
    files = sorted((REPO / "src" / "tlpipe").rglob("*.py")) + sorted((REPO / "stages").glob("*.py"))
    to_stdout = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                if not any(k.arg == "file" and ast.unparse(k.value) == "sys.stderr" for k in node.keywords):
                    to_stdout.append(f"{path.relative_to(REPO)}:{node.lineno}")
            elif isinstance(node, ast.Attribute) and ast.unparse(node) == "sys.stdout":
                if path != REPO / "src" / "tlpipe" / "cli" / "predict.py":
                    to_stdout.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not to_stdout, f"these write to stdout: {to_stdout}"
