"""Classify image files with a saved tlpipe model: the library behind `tlpipe predict`.

Every `models/*.keras` maps RGB float 0..255 images of its own `image_size` to probabilities and
carries its class names (see model.saved), so prediction needs nothing from params.yaml. Each file goes
through the same steps as in training (`imagefile.decode_file`): `images.normalise` gives the bytes
the data stage would store, TensorFlow decodes and resizes them as `inputs.read_resized` does. So a
CMYK, EXIF-rotated, 16-bit or GIF file is seen exactly as its twin in the training set was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from tlpipe import atomic
from tlpipe.config.choices import MODEL_NAMES
from tlpipe.runtime.errors import DataError, ImageDecodeError, ModelFileError
from tlpipe.features.imagefile import decode_file
from tlpipe.model.outputs import class_probabilities, predicted_indices
from tlpipe.model.tta import MIRROR, average, mirrored

# Best model first: the pipeline's last training stage writes finetuned.keras.
DEFAULT_MODELS = tuple(reversed(MODEL_NAMES))  # the most trained first
PROB_FORMAT = "{:.6f}"  # fixed digits: the CSV is byte-identical for the same model and files


@dataclass(frozen=True)
class Prediction:
    path: str  # as listed (POSIX separators)
    probabilities: tuple[float, ...] | None  # one per class; None when the file could not be read
    error: str = ""


@dataclass
class Evaluation:
    class_names: list[str]
    confusion: np.ndarray  # rows: true class, columns: predicted class
    skipped: list[str] = field(default_factory=list)  # unreadable files, not counted

    @property
    def total(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / self.total) if self.total else float("nan")


def default_model(models_dir: str | os.PathLike = "models") -> Path:
    """models/finetuned.keras if present, else head_aug, else head; ModelFileError when none is."""
    folder = Path(models_dir)
    for name in DEFAULT_MODELS:
        path = folder / f"{name}.keras"
        if path.is_file():
            return path
    wanted = ", ".join(f"{name}.keras" for name in DEFAULT_MODELS)
    raise ModelFileError(f"no model in {folder}/ (looked for {wanted}); run `dvc repro` or `dvc pull`, "
                         f"or pass --model PATH")


def load_classifier(path: str | os.PathLike):
    """(model, info) for a tlpipe model file; ModelFileError when it is missing or not a tlpipe model."""
    from tlpipe.model.saved import load_model, model_info

    model = load_model(path)
    info = model_info(model)
    names, size = info.get("class_names"), info.get("image_size")
    if not names or not size:
        raise ModelFileError(f"{path}: the model's metadata lacks class_names or image_size; "
                             f"use a model written by tlpipe")
    return model, info


def _hidden(name: str) -> bool:
    return name.startswith(".")


def collect_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named, and every non-hidden file under folders named (recursively, sorted).

    Folders contribute every file, not only known extensions: a stray `.heic` or a damaged file is
    then reported in the error column rather than silently missing from the output. Duplicates are
    dropped (first occurrence kept), so `predict a.jpg .` lists a.jpg once.
    """
    found: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            found.append(p)

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, files in os.walk(path):  # symlinked folders not followed: no cycles
                dirs[:] = sorted(d for d in dirs if not _hidden(d))
                for name in sorted(files):
                    if not _hidden(name):
                        add(Path(root) / name)
        elif path.exists() or path.is_symlink():
            add(path)  # named explicitly: always listed, even if hidden or odd
        else:
            raise DataError(f"{raw}: no such file or folder; pass image files or folders of images")
    return found


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def predict_files(model, files: Sequence[str | os.PathLike], image_size: int, n_classes: int,
                  batch_size: int = 32, progress: bool | None = None, tta: str = MIRROR) -> list[Prediction]:
    """Predictions for `files`, in order. Unreadable files get an error and no probabilities.

    `progress`: a bar on stderr (None: only when there is more than one batch; never when stderr is
    not a terminal, tlpipe.runtime.log.progress). `tta` "mirror": each file's outputs averaged with
    its mirror image's, as the evaluate stage scores them by default (model/tta.py); "none": the image alone.
    """
    from tlpipe.runtime.log import progress as bar_of

    if batch_size < 1:
        raise DataError(f"--batch-size must be a positive integer (got {batch_size})")
    show = len(files) > batch_size if progress is None else progress
    out: list[Prediction] = []
    with bar_of(total=len(files), unit="img", desc="predict", disable=True if not show else None) as bar:
        for chunk in _batches(list(files), batch_size):
            arrays, ok, results = [], [], {}
            for i, path in enumerate(chunk):
                try:
                    arrays.append(decode_file(path, image_size))
                    ok.append(i)
                except ImageDecodeError as exc:
                    results[i] = Prediction(Path(path).as_posix(), None, exc.reason)
            if arrays:
                # predict_on_batch: no per-call progress line and no tf.data set-up per batch.
                batch = np.stack(arrays)
                raw = np.asarray(model.predict_on_batch(batch))
                if tta == MIRROR:
                    raw = average(raw, model.predict_on_batch(np.ascontiguousarray(mirrored(batch))))
                probs = class_probabilities(raw, n_classes)
                for i, p in zip(ok, probs):
                    results[i] = Prediction(Path(chunk[i]).as_posix(), tuple(float(v) for v in p))
            out.extend(results[i] for i in range(len(chunk)))
            bar.update(len(chunk))
    return out


def predicted_class(pred: Prediction, class_names: Sequence[str]) -> str:
    if pred.probabilities is None:
        return ""
    return class_names[int(predicted_indices([pred.probabilities])[0])]


def to_csv(predictions: Sequence[Prediction], class_names: Sequence[str]) -> str:
    """CSV text: path, predicted, p_<class> for each class, error (empty when the file was read)."""
    rows = []
    for pred in predictions:
        if pred.probabilities is None:
            probs = [""] * len(class_names)
        else:
            probs = [PROB_FORMAT.format(p) for p in pred.probabilities]
        rows.append([pred.path, predicted_class(pred, class_names), *probs, pred.error])
    return atomic.csv_text(["path", "predicted", *(f"p_{c}" for c in class_names), "error"], rows)


def true_classes(files: Sequence[str | os.PathLike], root: str | os.PathLike,
                 class_names: Sequence[str]) -> list[str]:
    """The class of each file under `root`: its first folder below root, which must be a model class."""
    root = Path(root)
    known = set(class_names)
    labels, unknown, loose = [], set(), []
    for f in files:
        parts = Path(f).relative_to(root).parts
        if len(parts) < 2:
            loose.append(str(f))
            labels.append("")
            continue
        if parts[0] not in known:
            unknown.add(parts[0])
        labels.append(parts[0])
    if unknown:
        raise DataError(f"{root}: subfolder(s) {', '.join(sorted(unknown))} are not classes of the model "
                        f"({', '.join(class_names)}); --evaluate needs one subfolder per model class")
    if loose:
        raise DataError(f"{root}: {len(loose)} file(s) outside class subfolders (e.g. {loose[0]}); "
                        f"--evaluate needs every image inside a subfolder named after its class")
    return labels


def evaluate(predictions: Sequence[Prediction], truth: Sequence[str],
             class_names: Sequence[str]) -> Evaluation:
    """Confusion matrix and accuracy over the files that could be read."""
    index = {c: i for i, c in enumerate(class_names)}
    cm = np.zeros((len(class_names), len(class_names)), dtype=np.int64)
    skipped = []
    for pred, true in zip(predictions, truth, strict=True):
        if pred.probabilities is None:
            skipped.append(pred.path)
            continue
        cm[index[true], int(predicted_indices([pred.probabilities])[0])] += 1
    return Evaluation(list(class_names), cm, skipped)


def format_evaluation(ev: Evaluation) -> str:
    """Accuracy line and a text confusion matrix (rows: true class, columns: predicted)."""
    lines = [f"accuracy: {ev.accuracy:.4f} ({int(np.trace(ev.confusion))}/{ev.total} images)"]
    if ev.skipped:
        lines.append(f"not counted: {len(ev.skipped)} unreadable file(s)")
    names = ev.class_names
    width = max(len("true \\ predicted"), *(len(n) for n in names))
    cols = [max(len(n), len(str(int(ev.confusion.max(initial=0))))) for n in names]
    lines.append("confusion matrix (rows: true class, columns: predicted class)")
    lines.append("  ".join(["true \\ predicted".ljust(width), *(n.rjust(w) for n, w in zip(names, cols))]))
    for name, row in zip(names, ev.confusion):
        lines.append("  ".join([name.ljust(width), *(str(int(v)).rjust(w) for v, w in zip(row, cols))]))
    return "\n".join(lines) + "\n"
