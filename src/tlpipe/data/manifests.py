"""The split names and the files the data stage leaves for later stages: the split manifests
(`data/split/<split>.csv`) and the class list (`data/split/classes.json`), and how to read them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from tlpipe.config.choices import SPLITS  # noqa: F401 - defined with the other closed sets; read from here too
from tlpipe.runtime.errors import DataError

MANIFEST_COLUMNS = ["path", "class_name", "label", "sha256", "file"]


def read_manifest(csv_path) -> "pandas.DataFrame":  # noqa: F821
    """A split manifest as a DataFrame with columns path, class_name, label (int64), sha256, file."""
    import pandas as pd

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: manifest not found; run the data stage first (`dvc repro data`).")
    try:
        # keep_default_na=False: a class called "NA" or "null" stays a string.
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"{csv_path}: not a readable manifest ({exc}); rerun the data stage.") from None
    if list(df.columns) != MANIFEST_COLUMNS:
        raise DataError(f"{csv_path}: expected columns {','.join(MANIFEST_COLUMNS)}, found {','.join(df.columns)}; "
                        f"rerun the data stage.")
    try:
        df["label"] = df["label"].astype("int64")
    except ValueError:
        raise DataError(f"{csv_path}: column label holds non-integers; rerun the data stage.") from None
    return df


def read_class_names(json_path) -> list[str]:
    """The sorted class names from classes.json; label i is classes[i]."""
    json_path = Path(json_path)
    try:
        obj = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{json_path}: not found; run the data stage first (`dvc repro data`).") from None
    except (ValueError, OSError) as exc:
        raise DataError(f"{json_path}: not readable JSON ({exc}); rerun the data stage.") from None
    classes = obj.get("classes") if isinstance(obj, dict) else None
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{json_path}: expected {{\"classes\": [at least 2 names]}}; rerun the data stage.")
    return classes


def manifest_rows(manifest_csv, images_dir, classes: Sequence[str]) -> tuple[list[str], list[int], list[str]]:
    """(image files, labels, source paths) of a split manifest, checked against the class list."""
    csv = Path(manifest_csv)
    df = read_manifest(csv)
    classes = list(classes)
    labels = [int(x) for x in df["label"]]
    for i, (label, name) in enumerate(zip(labels, df["class_name"])):
        if not 0 <= label < len(classes) or classes[label] != name:
            raise DataError(f"{csv}: row {i + 2} has label {label} for class {name!r}, but the classes are "
                            f"{classes}; rerun the data stage (`dvc repro data`)")
    images_dir = Path(images_dir)
    files = [str(images_dir / f) for f in df["file"]]
    absent = [f for f in files if not os.path.isfile(f)]
    if absent:
        raise DataError(f"{absent[0]} (and {len(absent) - 1} more images of {csv.name}) not found; "
                        "rerun the data stage (`dvc repro data`)")
    return files, labels, [str(p) for p in df["path"]]


def first_image(manifest_csv, images_dir) -> Path:
    """The first image of a split manifest (the preview stage shows the first training image)."""
    df = read_manifest(manifest_csv)
    if not len(df):
        raise DataError(f"{manifest_csv}: no images; check the data split")
    return Path(images_dir) / str(df["file"].iloc[0])
