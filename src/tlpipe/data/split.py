"""Scan a folder of class subfolders, decode every image once, split per class, write manifests.

Layouts (see docs/design.md): `root/<class>/**` (split here by `data.split`), or
`root/{train,validation,test}/<class>/**` used as given. With only some of the three split folders
(e.g. train/ and validation/), they are pooled per class and split by `data.split`.

Outputs: the content-addressed store `data/images/<sha256>.{jpg,png}` and, in `data/split/`,
`{train,validation,test}.csv`, `classes.json`, `rejected.csv`, `summary.json`. All are written
under temporary names and renamed when complete; the same files and params give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tlpipe import atomic
from tlpipe.config.choices import check_split
from tlpipe.runtime.errors import ConfigError, DataError, ImageDecodeError
from tlpipe.data.images import MAX_SIDE, SMALL_SIDE, normalise_bytes, read_file
from tlpipe.data.manifests import MANIFEST_COLUMNS, SPLITS
from tlpipe.data.sources import is_hidden
from tlpipe.runtime.log import log, progress


# ---------------------------------------------------------------- scanning


@dataclass(frozen=True)
class Candidate:
    path: str  # relative POSIX path inside the source (through symlink names, as walked)
    file: Path  # where to read it
    class_name: str
    given_split: str | None  # the split folder it came from, when the layout is used as given


@dataclass(frozen=True)
class Scan:
    layout: str  # "classes" | "presplit" (used as given) | "pooled" (some split folders, re-split)
    candidates: list[Candidate]
    rejected: list[tuple[str, str]]
    classes: list[str]  # class folders that hold at least one candidate file


def _entries(folder: Path, rel: str, rejected: list) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            entries = [e for e in it if not is_hidden(e.name)]
    except OSError as exc:
        rejected.append((rel, f"unreadable folder: {exc.strerror or exc}".lower()))
        return []
    return sorted(entries, key=lambda e: e.name)  # never trust the file system's order


def _dir_key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: the real folder
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk(folder: Path, rel: str, seen: set, rejected: list):
    """Yield (relative path, path) of every non-hidden file below folder, following symlinks once."""
    for e in _entries(folder, rel, rejected):
        sub_rel, sub = f"{rel}/{e.name}", Path(e.path)
        try:
            is_dir = e.is_dir()  # follows symlinks
            is_file = not is_dir and e.is_file()
        except OSError:
            is_dir = is_file = False
        if is_dir:
            key = _dir_key(sub)
            if key is None or key in seen:  # a symlink loop or a folder already walked
                continue
            seen.add(key)
            yield from _walk(sub, sub_rel, seen, rejected)
        elif is_file:
            yield sub_rel, sub
        elif e.is_symlink() and not sub.exists():
            rejected.append((sub_rel, "broken symlink"))
        else:
            rejected.append((sub_rel, "not a regular file"))


def _class_dirs(folder: Path, rel: str, rejected: list) -> list[tuple[str, Path]]:
    out = []
    for e in _entries(folder, rel, rejected):
        sub_rel = f"{rel}/{e.name}" if rel else e.name
        if e.is_dir():
            out.append((e.name, Path(e.path)))
        else:
            rejected.append((sub_rel, "not inside a class folder"))
    return out


def scan_source(root: Path) -> Scan:
    """Find every candidate file and its class under root (no decoding yet)."""
    root = Path(root)
    rejected: list[tuple[str, str]] = []
    top = _class_dirs(root, "", rejected)
    split_names = [name for name, _ in top if name in SPLITS]
    if split_names and len(split_names) != len(top):
        others = sorted(name for name, _ in top if name not in SPLITS)
        raise DataError(
            f"{root} mixes split folders ({', '.join(split_names)}) with other folders ({', '.join(others)}); "
            f"use either one folder per class or train/ validation/ test/ folders of class folders."
        )
    if split_names:
        layout = "presplit" if len(split_names) == len(SPLITS) else "pooled"
        groups = [(split, _class_dirs(path, split, rejected)) for split, path in top]
    else:
        layout = "classes"
        groups = [(None, top)]
    # A symlink back to the root, a split folder or a class folder would loop or mix classes: skip those.
    reserved = {_dir_key(root)} | {_dir_key(p) for _, p in top}
    reserved |= {_dir_key(p) for _, class_dirs in groups for _, p in class_dirs}
    candidates, classes = [], set()
    empty = defaultdict(list)
    for split, class_dirs in groups:
        for class_name, path in class_dirs:
            prefix = f"{split}/{class_name}" if split else class_name
            seen = set(reserved)
            found = [Candidate(rel, file, class_name, split if layout == "presplit" else None)
                     for rel, file in _walk(path, prefix, seen, rejected)]
            if found:
                classes.add(class_name)
            else:
                empty[class_name].append(prefix + "/")
            candidates.extend(found)
    for class_name, folders in sorted(empty.items()):
        if class_name not in classes:
            log.warning(f"class folder {', '.join(folders)} in {root} holds no files; ignoring that class.")
    return Scan(layout, candidates, sorted(rejected), sorted(classes))


# ---------------------------------------------------------------- decoding into the store


@dataclass(frozen=True)
class Record:
    path: str
    class_name: str
    given_split: str | None
    sha256: str
    file: str  # name in the image store
    width: int
    height: int


def _store(folder: Path, name: str, data: bytes) -> None:
    dest = folder / name
    if dest.exists():  # content-addressed: same name, same bytes
        return
    atomic.write_bytes(dest, data)


def decode_candidates(candidates: list[Candidate], store: Path, max_side: int = MAX_SIDE,
                      workers: int | None = None) -> tuple[list[Record], list[tuple[str, str]]]:
    """Decode each candidate once, writing what the store keeps into `store`; (records, rejected)."""

    def decode(c: Candidate):
        try:
            data = read_file(c.file)
            digest = hashlib.sha256(data).hexdigest()
            out = normalise_bytes(data, c.file, max_side)
        except ImageDecodeError as exc:
            return None, (c.path, exc.reason)
        name = digest + out.ext
        try:
            _store(store, name, out.data)
        except OSError as exc:
            raise DataError(f"cannot write {store / name}: {exc.strerror or exc}") from None
        return Record(c.path, c.class_name, c.given_split, digest, name, out.width, out.height), None

    workers = workers or min(8, (os.cpu_count() or 1) + 2)  # Pillow releases the GIL while decoding
    records, rejected = [], []
    with ThreadPoolExecutor(workers) as pool:
        # map() yields in input order, so the result does not depend on thread timing.
        for rec, rej in progress(pool.map(decode, candidates), total=len(candidates), desc="decode images",
                                 unit="img", leave=False):
            if rec is not None:
                records.append(rec)
            else:
                rejected.append(rej)
    return records, rejected


def drop_label_noise(records: list[Record]) -> tuple[list[Record], list[tuple[str, str]]]:
    """The same bytes filed under two classes: reject every copy, naming the other class(es)."""
    classes_of = defaultdict(set)
    for r in records:
        classes_of[r.sha256].add(r.class_name)
    kept, rejected = [], []
    for r in records:
        others = sorted(classes_of[r.sha256] - {r.class_name})
        if others:
            rejected.append((r.path, f"same image also in class {', '.join(others)} (label noise)"))
        else:
            kept.append(r)
    return kept, rejected


# ---------------------------------------------------------------- splitting (pure)


def parse_split(split) -> tuple[str, dict[str, float | int]]:
    """("fractions" | "counts", {split: value}) from data.split (a mapping or the params section's
    attributes), by the rule params.yaml is checked with; ConfigError if unusable."""
    values = dict(split.items()) if hasattr(split, "items") else {s: getattr(split, s) for s in SPLITS}
    try:
        return check_split(values)
    except ValueError as exc:
        raise ConfigError(f"data.split: {exc}") from None


def split_sizes(n: int, split, class_name: str = "?") -> dict[str, int]:
    """Images of a class per split: counts as given, or fractions rounded by largest remainder."""
    kind, values = parse_split(split)
    if kind == "counts":
        want = sum(values.values())
        if want > n:
            asked = " + ".join(f"{values[s]} {s}" for s in SPLITS)
            raise DataError(
                f"data.split asks for {asked} = {want} images of class {class_name!r}, which has only {n}; "
                f"lower the counts or use fractions."
            )
        return dict(values)
    quotas = {s: n * values[s] for s in SPLITS}
    sizes = {s: math.floor(quotas[s] + 1e-9) for s in SPLITS}
    left = n - sum(sizes.values())
    # Largest remainder first; ties go to the earlier split (train, validation, test).
    order = sorted(SPLITS, key=lambda s: (-(quotas[s] - sizes[s]), SPLITS.index(s)))
    for s in order[:max(0, left)]:
        sizes[s] += 1
    return sizes


def assign_splits(records: list[Record], split, seed: int) -> dict[str, str]:
    """{path: split}, stratified per class, seeded; byte-identical images always share a split.

    Images not needed by count-based splits are left out of the result.
    """
    by_class = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_class[r.class_name][r.sha256].append(r.path)
    assignment = {}
    for class_name in sorted(by_class):
        groups = [sorted(paths) for _, paths in sorted(by_class[class_name].items())]
        n = sum(len(g) for g in groups)
        targets = split_sizes(n, split, class_name)
        # A string seed is hashed with SHA-512 by random: stable across runs and Python processes.
        random.Random(f"{seed}/{class_name}").shuffle(groups)
        filled = dict.fromkeys(SPLITS, 0)
        for group in groups:
            split_name = max(SPLITS, key=lambda s: (targets[s] - filled[s], -SPLITS.index(s)))
            if targets[split_name] - filled[split_name] <= 0:
                break  # count-based split satisfied: the rest is unused
            filled[split_name] += len(group)
            for path in group:
                assignment[path] = split_name
    return assignment


def check_min_per_split(counts: dict[str, dict[str, int]], classes: list[str], min_per_split: int) -> None:
    for class_name in classes:
        have = {s: counts[s].get(class_name, 0) for s in SPLITS}
        short = [s for s in SPLITS if have[s] < min_per_split]
        if short:
            got = ", ".join(f"{have[s]} {s}" for s in SPLITS)
            raise DataError(
                f"class {class_name!r} has {got} images: fewer than data.min_per_split={min_per_split} in "
                f"{', '.join(short)}. Add images to that class, remove its folder, or change data.split / "
                f"data.min_per_split."
            )


# ---------------------------------------------------------------- writing (atomic)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def write_split_files(out_dir: Path, records: list[Record], assignment: dict[str, str], classes: list[str],
                      rejected: list[tuple[str, str]], summary: dict) -> None:
    label = {c: i for i, c in enumerate(classes)}
    for split_name in SPLITS:
        rows = sorted(
            [r.path, r.class_name, label[r.class_name], r.sha256, r.file]
            for r in records if assignment.get(r.path) == split_name
        )
        atomic.write_csv(out_dir / f"{split_name}.csv", MANIFEST_COLUMNS, rows)
    atomic.write_bytes(out_dir / "classes.json", _json_bytes({"classes": classes}))
    atomic.write_csv(out_dir / "rejected.csv", ["path", "reason"], sorted(map(list, rejected)))
    atomic.write_bytes(out_dir / "summary.json", _json_bytes(summary))


# ---------------------------------------------------------------- the data stage


def build_dataset(root: Path, images_dir: Path, out_dir: Path, split, seed: int, min_per_split: int = 1,
                  max_side: int = MAX_SIDE, workers: int | None = None) -> dict:
    """Scan root, decode into images_dir, split, write out_dir's manifests; return the summary."""
    root, images_dir, out_dir = Path(root), Path(images_dir), Path(out_dir)
    parse_split(split)  # bad params fail before minutes of decoding
    scan = scan_source(root)
    if scan.layout == "pooled":
        present = sorted({c.path.split("/", 1)[0] for c in scan.candidates})
        log.info(f"{root} has {', '.join(f'{s}/' for s in present)} but not all of train/ validation/ test/: "
             f"pooling them per class and splitting by data.split.")
    if len(scan.classes) < 2:
        found = f"only class {scan.classes[0]!r}" if scan.classes else "no class folders with files"
        raise DataError(f"{root}: found {found}; a classifier needs at least 2 class folders of images.")

    with atomic.folder(images_dir) as store:  # a killed run's temp folder is removed first
        records, rejected = decode_candidates(scan.candidates, store, max_side, workers)
        records, noisy = drop_label_noise(records)
        if noisy:
            log.warning(f"{len(noisy)} files hold the same image as a file of another class; left out as label noise "
                 f"(listed in {out_dir / 'rejected.csv'}).")
        rejected = sorted(scan.rejected + rejected + noisy)
        classes = sorted({r.class_name for r in records})
        for class_name in scan.classes:
            if class_name not in classes:
                log.warning(f"class {class_name!r} has no usable images (all rejected); ignoring that class.")
        if len(classes) < 2:
            raise DataError(f"{root}: only {len(classes)} class(es) with usable images; need at least 2.")

        if scan.layout == "presplit":
            assignment = {r.path: r.given_split for r in records}
            straddle = [sha for sha, splits in _splits_by_sha(records).items() if len(splits) > 1]
            if straddle:
                log.warning(f"{len(straddle)} images appear in more than one of the given split folders "
                     f"(the same bytes in e.g. train/ and test/): results may be optimistic.")
        else:
            assignment = assign_splits(records, split, seed)
        counts = {s: dict(sorted(Counter(r.class_name for r in records if assignment.get(r.path) == s).items()))
                  for s in SPLITS}
        check_min_per_split(counts, classes, min_per_split)

        used = [r for r in records if r.path in assignment]
        keep = {r.file for r in used}
        for f in os.listdir(store):  # label noise and unused count-split images leave the store
            if f not in keep:
                os.unlink(store / f)
        small = sum(1 for r in used if min(r.width, r.height) < SMALL_SIDE)
        summary = {
            "layout": scan.layout,
            "classes": classes,
            "counts": counts,
            "totals": {s: sum(counts[s].values()) for s in SPLITS},
            "images": len(used),
            "unused": len(records) - len(used),
            "rejected": len(rejected),
            "small_images": small,
            "duplicate_images": len(used) - len(keep),
        }
    write_split_files(out_dir, used, assignment, classes, rejected, summary)

    if rejected:
        reasons = Counter(reason for _, reason in rejected)
        top = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda x: (-x[1], x[0]))[:4])
        log.warning(f"{len(rejected)} files rejected ({top}); see {out_dir / 'rejected.csv'}.")
    if small:
        log.info(f"{small} images are smaller than {SMALL_SIDE} px on a side (kept; later stages resize them up).")
    return summary


def _splits_by_sha(records: list[Record]) -> dict[str, set]:
    out = defaultdict(set)
    for r in records:
        out[(r.class_name, r.sha256)].add(r.given_split)
    return out
