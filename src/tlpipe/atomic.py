"""Atomic writes: build a file (or folder) under a hidden temp name in the same folder, then os.replace.
Every file and folder tlpipe swaps into place goes through `target` or `folder`.

A reader, or the rerun after a killed run, sees the old file or the new one, never a half-written
one. Temp names start with "." (`.<name>.<random>.tmp<suffix>`) so globs for outputs skip them.
Files get the mode a plain open() would give (0o666 & ~umask), folders that of mkdir (0o777 & ~umask):
mkstemp/mkdtemp make them private (0o600/0o700), which is wrong for shared data and reports.
Every CSV tlpipe writes (manifests, evaluation tables, predictions) is formatted by `csv_text`.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    m = os.umask(0)  # the only portable way to read it; put back at once
    os.umask(m)
    return m


@contextmanager
def target(path, suffix: str = "", fsync: bool = False) -> Iterator[Path]:
    """Yield a temp Path next to `path` for a writer that needs a file name (PIL, h5py, keras).

    On success the temp file gets ordinary permissions and replaces `path`; on any exception
    (KeyboardInterrupt included) it is removed and `path` is left as it was.
    `fsync`: flush the data to disk before the rename, and the rename after it (for resumable
    progress files: after a crash the file is there, whole).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(folder) -> None:
    """Make a rename in `folder` durable: the new name lives in the folder's own blocks."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path, data: bytes, fsync: bool = False) -> Path:
    """Write `data` to `path` atomically; return `path` as a Path."""
    path = Path(path)
    with target(path, fsync=fsync) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def write_text(path, text: str, fsync: bool = False) -> Path:
    """Write `text` as UTF-8 atomically, newlines as given (no translation)."""
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)


def csv_text(header, rows) -> str:
    """Every CSV tlpipe writes: a header row, then the rows; "\n" line ends, minimal quoting."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(path, header, rows) -> Path:
    """`csv_text(header, rows)` written to `path` atomically, as UTF-8."""
    return write_text(path, csv_text(header, rows))


@contextmanager
def folder(dest, *, fsync: bool = False, shared: bool = False) -> Iterator[Path]:
    """Yield a new empty hidden folder next to `dest` to fill; on success it takes `dest`'s place (an
    old `dest` is moved aside first, then removed); on any exception it is removed and `dest` is left.

    Folders cannot be replaced in one rename: a kill between moving the old one aside and renaming
    the new one in leaves no `dest` (readers then say to rerun). `fsync`: the rename reaches the disk
    before returning (the files inside are the caller's to sync). `shared`: other processes may
    build the same `dest` at once (a machine-wide cache): their temp folders are left alone, and a
    `dest` one of them finished first is kept. Otherwise the temp folders a killed run left are removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not shared:
        for stale in dest.parent.glob(f".{glob.escape(dest.name)}.*-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if shared and dest.is_dir():
            shutil.rmtree(tmp)
            return
        old = None
        if dest.exists() or dest.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
        if fsync:
            _fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def rounded(obj, digits: int = 6):
    """Floats rounded for JSON files that should not churn in the last bits."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def json_text(obj) -> str:
    """Sorted keys, rounded floats, indented: the text of every JSON file the pipeline writes."""
    return json.dumps(rounded(obj), sort_keys=True, indent=2) + "\n"


def write_json(path, obj) -> Path:
    """json_text(obj), written atomically (parent folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, json_text(obj), fsync=True)
