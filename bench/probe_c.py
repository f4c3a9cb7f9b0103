"""Benchmark: the linear probe's strength C (tlpipe.features.probe.C), chosen on validation.

The probe behind `backbone.layer: auto` fits a logistic regression of strength C on standardised
features of every candidate cut (block3/4/5_pool x flatten/avg/max). This script takes a split of
real photos (training images from train/, validation images from validation/, disjoint), runs the
VGG16 base once over them keeping the three candidate layers' activations, and scores every
candidate at each C with the pipeline's own probe code (tlpipe.features.probe.pool and .score, given
each C in turn). Validation only: no test image is read.

Prints a Markdown table (validation accuracy and log-loss per candidate and C), then, per C, how
many candidates it gives the lowest validation log-loss and the best (or equal-best) validation
accuracy. The images are decoded straight from the JPEG files with the pipeline's decode and
resize (tlpipe.features.inputs.read_resized), not through the data stage's store.

    python bench/probe_c.py --train 200 --val 100 --cs 0.01,0.1,1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_SOURCE, make_split  # noqa: E402  (bench/common.py)

CANDIDATE_LAYERS = ("block3_pool", "block4_pool", "block5_pool")
POOLINGS = ("flatten", "avg", "max")


def activations(files, base, layers, image_size: int, preprocessing: str, batch: int):
    """{layer: (N, H, W, C) float32} for the image files, in order, through one forward pass."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tlpipe.features.backbones import preprocess
    from tlpipe.features.inputs import read_resized

    model = keras.Model(base.input, [base.get_layer(name).output for name in layers])
    out = {name: [] for name in layers}
    for start in range(0, len(files), batch):
        images = tf.stack([read_resized(str(f), image_size) for f in files[start:start + batch]])
        for name, a in zip(layers, model(preprocess(images, preprocessing), training=False)):
            out[name].append(np.asarray(a, dtype=np.float32))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=Path(DEFAULT_SOURCE), help="folder with train/ and validation/ of class folders")
    ap.add_argument("--train", type=int, default=200, help="training images per class")
    ap.add_argument("--val", type=int, default=100, help="validation images per class")
    ap.add_argument("--cs", default="0.01,0.1,1", help="probe strengths C, comma-separated")
    ap.add_argument("--weights", default="hed-bsds500")
    ap.add_argument("--size", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    cs = [float(c) for c in args.cs.split(",")]

    import pandas as pd

    from tlpipe.features import probe
    from tlpipe.features.backbones import preprocessing_name
    from tlpipe.features.pretrained import build_base

    with tempfile.TemporaryDirectory() as tmp:
        split = make_split(args.source, Path(tmp), args.train, args.val, 0)
        frames = {part: pd.read_csv(split / f"{part}.csv") for part in ("train", "validation")}
    base = build_base("vgg16", args.weights, args.size)
    layers = [name for name in CANDIDATE_LAYERS if name in {layer.name for layer in base.layers}]
    t = time.perf_counter()
    acts, labels = {}, {}
    for part, frame in frames.items():
        acts[part] = activations([args.source / f for f in frame["file"]], base, layers, args.size,
                                 preprocessing_name("vgg16", args.weights), args.batch_size)
        labels[part] = frame["label"].to_numpy()
    print(f"# {len(labels['train'])} training, {len(labels['validation'])} validation images from {args.source}, "
          f"{args.size} px, weights {args.weights}; forward pass {time.perf_counter() - t:.0f} s; "
          f"{os.cpu_count()} CPUs", file=sys.stderr, flush=True)

    pipeline_c, rows = probe.C, []
    for layer in layers:
        for pooling in POOLINGS:
            xt, xv = probe.pool(acts["train"][layer], pooling), probe.pool(acts["validation"][layer], pooling)
            for c in cs:
                rows.append({"layer": layer, "pooling": pooling, "dim": xt.shape[1], "C": c,
                             **probe.score(xt, labels["train"], xv, labels["validation"], c=c)})
    print("| layer | pooling | dim | " + " | ".join(f"val acc (C={c:g}) | val log-loss (C={c:g})" for c in cs) + " |")
    print("|---|---|---|" + "---|---|" * len(cs))
    lowest_loss, best_acc = dict.fromkeys(cs, 0), dict.fromkeys(cs, 0)
    for layer in layers:
        for pooling in POOLINGS:
            mine = [r for r in rows if (r["layer"], r["pooling"]) == (layer, pooling)]
            print(f"| {layer} | {pooling} | {mine[0]['dim']} | "
                  + " | ".join(f"{r['val_accuracy']:.1%} | {r['val_loss']:.3f}" for r in mine) + " |")
            lowest_loss[min(mine, key=lambda r: r["val_loss"])["C"]] += 1
            top = max(r["val_accuracy"] for r in mine)
            for r in mine:
                best_acc[r["C"]] += r["val_accuracy"] == top
    n = len(layers) * len(POOLINGS)
    for c in cs:
        print(f"C={c:g}: lowest validation log-loss for {lowest_loss[c]} of {n} candidates, "
              f"best or equal-best validation accuracy for {best_acc[c]} of {n}")
    for c in cs:
        winner = probe.best([r for r in rows if r["C"] == c])
        print(f"probe's choice at C={c:g}: {winner['layer']} {winner['pooling']}"
              + (" (the pipeline's C)" if c == pipeline_c else ""))


if __name__ == "__main__":
    main()
