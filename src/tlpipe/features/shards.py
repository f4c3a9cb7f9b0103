"""Sharded tables: fixed-size row shards written by workers, read as one HDF5 table.

A table of N rows (a split's features, a part of the view cache) is cut into shards of
`rows_per_shard` rows: shard i holds rows [i*R, (i+1)*R), so the cut depends on N and R only, never
on the engine or the cluster. Whichever worker computes a shard writes it, whole, as one small
HDF5 file (one dataset `data`, contiguous, written in one call, under a temp name then renamed):
its bytes depend on its rows alone. A chunked dataset filled piece by piece would not do: h5py lays
chunks out in the order they arrive, so the same rows written in another order give other bytes
(measured; docs/scale.md).

While a stage runs, shards go to its work folder (not a DVC output, so a killed `dvc repro` keeps
them; see extract.py). When all exist, the driver moves them (renames, no copy) into the output's
shard folder with `manifest.json` (each shard's file, rows, size and SHA-256, and the fingerprint
of what made them), and writes the table file: small datasets and attributes as before, and the
big one as an HDF5 virtual dataset mapping each row range onto its shard. Readers open the table
file and read rows as from any dataset; `check` first makes sure the manifest is the one the table
was made with and that every shard is there, since a virtual dataset reads a missing shard as
fill values without complaint. A rerun verifies the shards it finds against the manifest's
hashes (in the workers) and recomputes only the missing or damaged ones.

    features/train.h5                 labels, paths, attrs, `features` -> train.shards/*.h5
    features/train.shards/000000.h5   rows 0..R-1 ...
    features/train.shards/manifest.json
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from tlpipe import atomic
from tlpipe.runtime.errors import DataError, FeatureFileError
from tlpipe.hashes import file_sha256

DATA = "data"  # the dataset name inside every shard file
MANIFEST = "manifest.json"


def ranges(n: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """(start, stop) of each shard of an n-row table."""
    return [(s, min(n, s + rows_per_shard)) for s in range(0, n, rows_per_shard)]


def rows_per_shard(batch_size: int, rows: int | None, target: int) -> int:
    """Rows per shard: `rows`, or about `target` in whole batches (None). A multiple of the batch size,
    so a shard's batches are the batches a whole run would make."""
    rows = rows or batch_size * max(1, round(target / batch_size))
    if rows % batch_size:
        raise ValueError(f"rows per shard ({rows}) must be a multiple of batch_size ({batch_size})")
    return rows


def file_rows(files, labels, paths) -> list[list]:
    """What a fingerprint records of each input row. Store files are content-addressed, so name and
    size identify them (mtime changes on checkout)."""
    return [[os.path.basename(f), os.path.getsize(f), int(l), str(p)] for f, l, p in zip(files, labels, paths)]


def fingerprint(data: dict) -> str:
    """Hash of everything a table's bytes depend on: `data` (settings, `file_rows`), and the TensorFlow
    and Keras versions and thread pool that compute them; a different one discards saved progress."""
    import keras
    import tensorflow as tf

    from tlpipe.runtime.threads import INTRA_OP_THREADS

    blob = {**data, "versions": [tf.__version__, keras.__version__], "intra_op_threads": INTRA_OP_THREADS}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def shard_name(index: int, prefix: str = "") -> str:
    return f"{prefix}{index:06d}.h5"


def shards_dir(table) -> Path:
    """The folder of a table file's shards: features/train.h5 -> features/train.shards."""
    table = Path(table)
    return table.with_name(f"{table.stem}.shards")


def work_dir(table) -> Path:
    """The work folder of a table file's unfinished shards: features/train.h5 -> features/.train.h5.work."""
    table = Path(table)
    return table.with_name(f".{table.name}.work")


def plain_attrs(attrs) -> dict:
    """HDF5 attributes as plain Python (str, int, float), so they compare and serialise simply."""
    def plain(v):
        return v.decode() if isinstance(v, bytes) else v.item() if isinstance(v, np.generic) else v

    return {k: plain(v) for k, v in attrs.items()}


def check_room(folder, size: int) -> None:
    """Refuse before writing `size` bytes into `folder`: HDF5 reports a failed write only when the
    file closes, as a RuntimeError, and h5py may then crash while freeing it; so a full disk (or a
    file-size limit) must not get that far."""
    import resource

    free = shutil.disk_usage(folder).free
    if free < size:
        raise OSError(errno.ENOSPC, f"No space left on device: {size >> 20} MiB needed, {free >> 20} MiB free")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < size:
        raise OSError(errno.EFBIG, f"File too large: {size} bytes needed, the file-size limit (ulimit -f) is {limit}")


def write_shard(path, array: np.ndarray) -> None:
    """One finished shard, atomically and synced: a shard file that exists is complete."""
    import h5py

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    check_room(Path(path).parent, array.nbytes + (64 << 10))  # data + HDF5's metadata
    with atomic.target(path, fsync=True) as tmp:
        with h5py.File(tmp, "w", libver=("earliest", "v110")) as f:
            f.create_dataset(DATA, data=array, track_times=False)


def valid_shard(path, shape: tuple, dtype) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            d = f[DATA]
            return d.shape == tuple(shape) and d.dtype == np.dtype(dtype)
    except (OSError, KeyError, ValueError, RuntimeError):
        return False


def prepare_work(work: Path, fp: str) -> None:
    """A work folder for progress made with fingerprint `fp`; one of other inputs is discarded."""
    marker = work / "fingerprint"
    if work.exists() and (not marker.is_file() or marker.read_text() != fp):
        shutil.rmtree(work)  # stale progress of other inputs or parameters
    work.mkdir(parents=True, exist_ok=True)
    for stray in work.glob(".*.tmp*"):  # temp file of a killed write
        stray.unlink(missing_ok=True)
    if not marker.is_file():
        atomic.write_bytes(marker, fp.encode(), fsync=True)


def reusable(table, fp: str) -> dict[str, str]:
    """{shard file name: sha256} of a finished table made with fingerprint `fp` (else {})."""
    path = shards_dir(table) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if manifest.get("fingerprint") != fp:
        return {}
    return {s["file"]: s["sha256"] for s in manifest.get("shards", [])}


def ensure_shard(job: dict, compute: Callable[[], np.ndarray]) -> dict:
    """Run in a worker: make job["target"] a valid shard and return its hash and timings.

    Kept if the work folder already has it whole (a resumed run); else taken from the finished
    table's shard folder if its hash matches the manifest (`job["reuse"]`: [path, sha256]); else
    computed by `compute()` (which fills the timings it measures into the returned dict)."""
    target, shape, dtype = Path(job["target"]), tuple(job["shape"]), job["dtype"]
    timings: dict = {}
    if valid_shard(target, shape, dtype):
        return {"sha256": file_sha256(target), "bytes": target.stat().st_size, "computed": False}
    reuse = job.get("reuse")
    if reuse and os.path.isfile(reuse[0]) and file_sha256(reuse[0]) == reuse[1]:
        os.replace(reuse[0], target)
        return {"sha256": reuse[1], "bytes": target.stat().st_size, "computed": False}
    array = compute(timings)
    if array.shape != shape or array.dtype != np.dtype(dtype):
        raise ValueError(f"shard {target.name}: computed {array.shape} {array.dtype}, expected {shape} {dtype}")
    t = time.perf_counter()
    write_shard(target, array)
    timings["write_s"] = time.perf_counter() - t
    return {"sha256": file_sha256(target), "bytes": target.stat().st_size, "computed": True, **timings}


def publish(table, work: Path, entries: list[dict], fingerprint: str, keep: bool = False) -> str:
    """Move the shards of `entries` ({file, start, rows, sha256, bytes}, in row order) from `work`
    into the table's shard folder, with the manifest; returns the manifest's SHA-256 (an attribute
    of the table file, so the table's bytes change whenever a shard does). `keep`: link them
    instead, leaving `work` whole for a rerun (extract_splits keeps every split's until the last)."""
    manifest = json.dumps({"fingerprint": fingerprint, "shards": entries}, indent=1, sort_keys=True).encode()
    # A kill while swapping leaves the old table file pointing at a folder without its manifest,
    # which `check` refuses; the rerun redoes it.
    with atomic.folder(shards_dir(table), fsync=True) as staging:
        for e in entries:
            if not keep:
                os.replace(work / e["file"], staging / e["file"])
                continue
            try:
                os.link(work / e["file"], staging / e["file"])
            except OSError:  # a file system without hard links
                shutil.copy2(work / e["file"], staging / e["file"])
        atomic.write_bytes(staging / MANIFEST, manifest, fsync=True)
    return hashlib.sha256(manifest).hexdigest()


def create_virtual(group, name: str, shape: tuple, dtype, sources: list[tuple[int, int, str]]) -> None:
    """Dataset `name` of `group` as a virtual dataset: rows [start, start+rows) of it are dataset
    `data` of file `relpath` (relative to the table file's folder, where HDF5 looks first). Without
    timestamps, so its bytes depend only on the mapping (h5py's create_virtual_dataset sets them)."""
    import h5py

    dtype = np.dtype(dtype)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_obj_track_times(False)
    dcpl.set_fill_value(np.zeros(1, dtype))
    space = h5py.h5s.create_simple(tuple(shape))
    rest = tuple(shape[1:])
    for start, rows, relpath in sources:
        vsel = h5py.h5s.create_simple(tuple(shape))
        vsel.select_hyperslab((start,) + (0,) * len(rest), (rows,) + rest)
        src = h5py.h5s.create_simple((rows,) + rest)
        dcpl.set_virtual(vsel, relpath.encode(), DATA.encode(), src)
    h5py.h5d.create(group.id, name.encode(), h5py.h5t.py_create(dtype, logical=True), space, dcpl=dcpl)


def check(table, manifest_sha256: str, rerun: str) -> None:
    """FeatureFileError unless the table's shard folder holds the manifest it was made with and
    every shard of it, whole (sizes; DVC checks content hashes on checkout and pull)."""
    folder = shards_dir(table)
    path = folder / MANIFEST
    try:
        data = path.read_bytes()
    except OSError:
        raise FeatureFileError(f"{table}: its shard folder {folder} or {path.name} is missing; {rerun}") from None
    if hashlib.sha256(data).hexdigest() != manifest_sha256:
        raise FeatureFileError(f"{table}: {path} is not the manifest this table was written with; {rerun}")
    for s in json.loads(data)["shards"]:
        p = folder / s["file"]
        if not p.is_file() or p.stat().st_size != s["bytes"]:
            raise FeatureFileError(f"{table}: shard {p} is missing or damaged; {rerun}")


def run_local(jobs: list[dict], make_worker: Callable, progress: Callable[[dict], None] | None = None) -> dict:
    """The local engine: one worker built here runs every job in order; {job["shard"]: result}."""
    worker = make_worker() if jobs else None
    results = {}
    for job in jobs:
        results[job["shard"]] = {"shard": job["shard"], **worker(job)}
        if progress is not None:
            progress(results[job["shard"]])
    return results


def compute_batches(files: list[str], batch_size: int, batches: Iterable, forward: Callable,
                    timings: dict) -> np.ndarray:
    """A worker's loop over one shard: `batches` yields the decoded images of `files` batch by batch
    (decoding may run ahead); `forward(start, stop, images)` gives their rows. Fills `timings` with
    decode_s (what the model waited for images) and forward_s. DataError names a file that cannot be
    read or decoded."""
    import tensorflow as tf

    problem = unreadable(files)
    if problem:
        raise DataError(problem)
    timings.update(decode_s=0.0, forward_s=0.0)
    it, out = iter(batches), []
    for start, stop in ranges(len(files), batch_size):
        t = time.perf_counter()
        try:
            images = next(it)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as exc:
            raise DataError(f"cannot read an image among {files[start]} and the {stop - start - 1} after it "
                            f"({exc.message.splitlines()[0]}); rerun the data stage (`dvc repro data`)") from None
        t2 = time.perf_counter()
        out.append(forward(start, stop, images))
        timings["decode_s"] += t2 - t
        timings["forward_s"] += time.perf_counter() - t2
    return np.concatenate(out)


def unreadable(files: Iterable[str]) -> str | None:
    """The first of `files` this process cannot open, with where it runs, or None. A Ray worker on
    another node sees only what that node mounts: the message says where the data must live."""
    for f in files:
        if not os.access(f, os.R_OK):
            return (f"{f}: cannot be read on host {socket.gethostname()} (pid {os.getpid()}); with "
                    f"compute.engine: ray every node must see the image store and the outputs at the same "
                    f"path (a shared filesystem), and the file must exist (rerun `dvc repro data`)")
    return None
