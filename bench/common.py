"""Helpers the benchmarks share: a split of the real photos, validated params, a paired accuracy difference."""

from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT_SOURCE = "/work/shared/datasets/cats_and_dogs_filtered"


def make_split(source: Path, out: Path, train_n: int, val_n: int, test_n: int) -> Path:
    """Manifests in data/split format: train from train/, validation and test from validation/ (disjoint)."""
    import pandas as pd

    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    split = out / "split"
    split.mkdir(parents=True, exist_ok=True)

    def rows(folder, cls, label, files):
        return [{"path": f"{folder}/{cls}/{f}", "class_name": cls, "label": label, "sha256": "",
                 "file": f"{folder}/{cls}/{f}"} for f in files]

    parts = {"train": [], "validation": [], "test": []}
    for label, cls in enumerate(classes):
        train = sorted(os.listdir(source / "train" / cls))[:train_n]
        val = sorted(os.listdir(source / "validation" / cls))
        if len(train) < train_n or len(val) < val_n + test_n:
            raise SystemExit(f"{source}: not enough {cls} images for the requested subset")
        parts["train"] += rows("train", cls, label, train)
        parts["validation"] += rows("validation", cls, label, val[:val_n])
        parts["test"] += rows("validation", cls, label, val[val_n:val_n + test_n])
    for part, r in parts.items():
        pd.DataFrame(sorted(r, key=lambda x: x["path"])).to_csv(split / f"{part}.csv", index=False)
    (split / "classes.json").write_text(json.dumps({"classes": classes}))
    return split


def extract_split(manifest_csv, images_dir, out_h5, extractor, classes, batch_size: int, chunk_rows=None,
                  engine=None) -> Path:
    """One split's feature file by the extract stage's own steps (features.extract's compute_split and
    assemble_split, which the stage runs for every split at once), its work folder removed."""
    import shutil

    from tlpipe.features.extract import assemble_split, compute_split

    done = compute_split(manifest_csv, images_dir, out_h5, extractor, classes, batch_size, chunk_rows, engine)
    assemble_split(done, extractor.dim, extractor.attrs(classes))
    shutil.rmtree(done.work)
    return done.out


def print_sweep(rows: list[dict], chosen: float) -> None:
    """head.lr auto's sweep (tlpipe.train.lr_search) as a Markdown table, the chosen rate marked."""
    print("| lr | best epoch | val loss | val acc |\n|---|---|---|---|")
    for r in rows:
        mark = " ←" if r["lr"] == chosen else ""
        print(f"| {r['lr']:g}{mark} | {r['best_epoch']} | {r['val_loss']:.3f} | {r['val_accuracy']:.1%} |", flush=True)


def paired_difference(a, b, rounds: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Accuracy of a minus accuracy of b on the same test images, with a 95% paired bootstrap interval
    (resampling images, so what both models get right or wrong together does not count as noise)."""
    import numpy as np

    d = a.astype(np.float64) - b.astype(np.float64)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(rounds, len(d)))
    boot = d[idx].mean(axis=1)
    return float(d.mean()), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def add_base_args(ap) -> None:
    """The base and the cut: image size, weights, feature layer, pooling."""
    ap.add_argument("--size", type=int, default=150)
    ap.add_argument("--weights", default="hed-bsds500")
    ap.add_argument("--layer", default="block4_pool",
                    help="backbone.layer, named (the benches build no probe; block4_pool: what the probe picks for "
                         "hed-bsds500 on the shared photos, docs/results.md)")
    ap.add_argument("--pooling", default="avg", choices=("flatten", "avg", "max"))


def add_model_args(ap) -> None:
    """The arguments params_for reads besides views and epochs."""
    add_base_args(ap)
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--head-lr", type=float, default=2e-5)
    ap.add_argument("--finetune-lr", type=float, default=1e-5)


def params_for(args, mode: str, views: int | None = None, augment: dict | None = None):
    """Validated params for a benchmark run: the stages' defaults, with the bench's size, weights,
    layer, pooling, precision, views, epochs and learning rates (args), in augment `mode`.

    The layer is always named: `backbone.layer: auto` is the extract stage's probe, which the benches
    do not run (the view cache and finetune.unfreeze_from: auto need the cut it would store)."""
    from tlpipe.config import validate_params

    aug = {"mode": mode, "views": views or args.views}
    aug.update(augment or {})
    return validate_params({
        "backbone": {"name": "vgg16", "weights": args.weights, "image_size": args.size,
                     "layer": args.layer, "pooling": args.pooling},
        "compute": {"precision": args.precision, "batch_size": 32},
        "augment": aug,
        "head": {"units": 256, "dropout": 0.5},
        "head_aug": {"epochs": args.epochs, "batch_size": 20, "lr": args.head_lr},
        "finetune": {"epochs": args.epochs, "batch_size": 20, "lr": args.finetune_lr},
    })
