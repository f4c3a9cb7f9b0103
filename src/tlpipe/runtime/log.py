"""tlpipe's messages: one logger, one level, one look, and progress bars only where someone watches.

    from tlpipe.runtime.log import log
    log.info("...")      # prints "note: ..." on stderr
    log.warning("...")   # prints "warning: ..."

The level comes from the environment, TLPIPE_LOG_LEVEL (debug, info, warning, error; default info),
because flags cannot pass through `dvc repro` to a stage; so does TLPIPE_PROGRESS (see progress). `setup()` runs when a stage or a `tlpipe`
command starts (tlpipe.cli.start); a library imported in a notebook leaves the host's logging alone
(its records then go wherever the host sends the `tlpipe` logger's). Deliberate errors do not go
through here: run_stage prints `error: <message>` itself, whatever the level.
"""

from __future__ import annotations

import logging
import sys

from tlpipe.runtime.errors import ConfigError

LEVEL_ENV = "TLPIPE_LOG_LEVEL"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
PREFIX = {logging.DEBUG: "debug", logging.INFO: "note", logging.WARNING: "warning", logging.ERROR: "error",
          logging.CRITICAL: "error"}

log = logging.getLogger("tlpipe")


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at each record (pytest's capture, a redirect)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass

    def emit(self, record: logging.LogRecord) -> None:
        # Through tqdm.write: on a terminal, a line printed while a bar is drawn would break it.
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # as StreamHandler.emit: a failing message must not stop the stage
            self.handleError(record)


class _Prefixed(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{PREFIX.get(record.levelno, record.levelname.lower())}: {record.getMessage()}"


def level_from_env(environ=None) -> int:
    """The level TLPIPE_LOG_LEVEL names (default info); ConfigError naming the variable otherwise."""
    import os

    value = (environ if environ is not None else os.environ).get(LEVEL_ENV, "").strip().lower() or "info"
    if value not in LEVELS:
        raise ConfigError(f"{LEVEL_ENV}={value!r}: choose one of {', '.join(LEVELS)}")
    return LEVELS[value]


def setup(environ=None) -> None:
    """Send the `tlpipe` logger's records to stderr, prefixed by level, at TLPIPE_LOG_LEVEL (once)."""
    log.setLevel(level_from_env(environ))
    if not any(getattr(h, "_tlpipe", False) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(_Prefixed())
        handler._tlpipe = True
        log.addHandler(handler)
    log.propagate = False  # not twice when the host also logs to stderr


PROGRESS_ENV = "TLPIPE_PROGRESS"  # 1: bars even off a terminal (a log you tail); 0: never


def progress(iterable=None, **kwargs):
    """A tqdm bar on stderr, shown only when stderr is a terminal: a queued experiment's or CI's log
    would otherwise fill with carriage-return frames. TLPIPE_PROGRESS=1 shows it anyway, 0 never;
    `disable=True` still hides it."""
    import os

    from tqdm import tqdm

    if kwargs.get("disable") is not True:
        forced = os.environ.get(PROGRESS_ENV, "").strip()
        kwargs["disable"] = forced == "0" if forced in ("0", "1") else not _stderr_is_terminal()
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, **kwargs)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False
