"""Benchmark: training speed of the view cache against the book's online way, the two interleaved.

This machine's throughput swings by up to 2x from one minute to the next (the same work takes
26 or 52 ms, as if a core came and went; docs/benchmarks.md). Timing one mode's whole run and
then the other's can be off by that factor. Here both modes train the models their stages build
(train.models.cached_training_model or the full model, compiled by train.compile.compile_classifier)
on the data their stages read (train.views.CachedViews, FrozenSuffix and train.online.OnlineAugmented), in alternating rounds
of about --round-seconds each, the order flipping every round: each round's ratio compares two
neighbours in time.

For train_head_aug and finetune it prints seconds per training image and per validation image in
each mode (medians over rounds) and the ratio online/cached of an epoch of --epoch-train training
and --epoch-val validation images (the default split of cats_and_dogs_filtered: 1500 and 750):
the median of the per-round ratios, with a 95% bootstrap interval over rounds. One-time costs
(the cache build, the frozen-suffix pass of train_head_aug) are printed separately; per-epoch
costs (reading the epoch's views from the cache, augmenting the online images) are included.

    python bench/speed.py                   # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).parent))

from common import DEFAULT_SOURCE, add_model_args, make_split, params_for  # noqa: E402  (bench/common.py)


@dataclass
class Side:
    """One mode of one stage: a compiled model, its training data per (epoch, rows), its validation data."""
    name: str
    model: object
    train: Callable  # (epoch, rows) -> (x, y)
    val: tuple
    n_train: int
    extra_per_image: float = 0.0  # per-epoch data cost measured once (the cache read), seconds per image
    train_s: list = field(default_factory=list)
    val_s: list = field(default_factory=list)
    k_train: int = 0
    k_val: int = 0


def _rows(start: int, k: int, n: int):
    import numpy as np

    return (start + np.arange(k)) % n


def timed(side: Side, batch: int, round_no: int, record: bool = True) -> None:
    """One round of `side`: fit on k_train training images, evaluate on k_val validation images."""
    import numpy as np

    t0 = time.perf_counter()
    x, y = side.train(round_no, _rows(round_no * side.k_train, side.k_train, side.n_train))
    side.model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)
    t1 = time.perf_counter()
    rows = _rows(round_no * side.k_val, side.k_val, len(side.val[1]))
    side.model.evaluate(side.val[0][rows], np.asarray(side.val[1])[rows], batch_size=batch, verbose=0)
    t2 = time.perf_counter()
    if record:
        side.train_s.append((t1 - t0) / side.k_train + side.extra_per_image)
        side.val_s.append((t2 - t1) / side.k_val)


def calibrate(side: Side, batch: int, seconds: float, cap: int) -> None:
    """Trace the model's functions, then size its rounds to take about `seconds` (train) and a third (val)."""
    side.k_train = side.k_val = 2 * batch
    timed(side, batch, 0, record=False)  # traces fit and evaluate
    t = time.perf_counter()
    timed(side, batch, 1, record=False)
    per = (time.perf_counter() - t) / side.k_train

    def size(s):
        return int(min(cap, max(batch, round(s / per / batch) * batch)))
    side.k_train, side.k_val = size(seconds), size(seconds / 3)


def compare(stage: str, cached: Side, online: Side, args) -> str:
    import numpy as np

    for side in (cached, online):
        calibrate(side, args.batch_size, args.round_seconds, args.max_chunk)
    for r in range(args.rounds):
        for side in ((cached, online) if r % 2 == 0 else (online, cached)):
            timed(side, args.batch_size, r + 2)
        print(f"# {stage} round {r + 1}/{args.rounds}: cached {cached.train_s[-1] * 1e3:.1f} ms/image, "
              f"online {online.train_s[-1] * 1e3:.1f} ms/image", file=sys.stderr, flush=True)

    def epoch(side):
        return args.epoch_train * np.array(side.train_s) + args.epoch_val * np.array(side.val_s)
    ratios = epoch(online) / epoch(cached)
    train_ratios = np.array(online.train_s) / np.array(cached.train_s)
    boot = np.random.default_rng(0).choice(ratios, size=(10000, len(ratios)))
    lo, hi = np.percentile(np.median(boot, axis=1), [2.5, 97.5])
    med = statistics.median
    return (f"{stage}: ms per training image cached {med(cached.train_s) * 1e3:.1f}, online "
            f"{med(online.train_s) * 1e3:.1f} (train-step ratio {med(train_ratios):.1f}x); per validation image "
            f"cached {med(cached.val_s) * 1e3:.2f}, online {med(online.val_s) * 1e3:.1f}\n"
            f"{stage}: epoch of {args.epoch_train} + {args.epoch_val} images: cached "
            f"{med(epoch(cached)):.1f} s, online {med(epoch(online)):.1f} s -> online/cached {med(ratios):.1f}x "
            f"(95% interval {lo:.1f} .. {hi:.1f}; {args.rounds} rounds; per round "
            f"{' '.join(f'{r:.1f}' for r in ratios)})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=Path(DEFAULT_SOURCE))
    ap.add_argument("--train-per-class", type=int, default=100, help="images in the cache (rounds cycle through them)")
    ap.add_argument("--val-per-class", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--round-seconds", type=float, default=8.0, help="about how long each side trains per round")
    ap.add_argument("--max-chunk", type=int, default=2000, help="most images one side trains on per round")
    ap.add_argument("--epoch-train", type=int, default=1500)
    ap.add_argument("--epoch-val", type=int, default=750)
    ap.add_argument("--batch-size", type=int, default=20, help="params.yaml: head_aug/finetune.batch_size")
    add_model_args(ap)
    ap.add_argument("--stages", default="head_aug,finetune")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args(argv)
    args.views, args.epochs = 1, 1  # params_for: one view per image is enough to time a step
    stages = set(args.stages.split(","))
    if not stages <= {"head_aug", "finetune"}:
        ap.error(f"--stages: a comma-separated list of head_aug and finetune, got {args.stages!r}")
    if not args.source.is_dir():
        raise SystemExit(f"{args.source}: not found; pass --source (a folder with train/ and validation/)")

    from tlpipe.features import viewcache
    from tlpipe.features.augment import augment_settings
    from tlpipe.data.manifests import read_class_names
    from tlpipe.model.saved import head_submodel, save_model
    from tlpipe.train.compile import compile_classifier
    from tlpipe.train.online import OnlineAugmented
    from tlpipe.train.views import CachedViews, FrozenSuffix
    from tlpipe.train.models import cached_training_model, detached, finetune_model, new_model

    work = args.work or Path(tempfile.mkdtemp(prefix="tlpipe-bench-speed-"))
    split = make_split(args.source, work, args.train_per_class, args.val_per_class, 1)
    p = params_for(args, "cached")
    classes = read_class_names(split / "classes.json")
    print(f"# {2 * args.train_per_class} train, {2 * args.val_per_class} val images, {args.size}px, "
          f"{args.weights}, {args.precision}, batch {args.batch_size}; {os.cpu_count()} CPUs", file=sys.stderr)

    cache = work / "views.h5"
    t = time.perf_counter()
    viewcache.build_from_manifests(split, args.source, cache, backbone=p.backbone, augment=p.augment,
                                   compute=p.compute, unfreeze_from=p.finetune.unfreeze_from)
    build_s = time.perf_counter() - t
    views = CachedViews(cache, seed=0)  # the stages' data sources: cached views, images augmented online
    boundary, n = views.attrs["boundary"], views.reader.n
    reads = []
    for e in range(3):
        t = time.perf_counter()
        acts, labels = views.epoch(e)
        reads.append(time.perf_counter() - t)
    read_per_image = statistics.median(reads) / n
    val_acts, val_labels = views.validation()
    online_data = OnlineAugmented.from_manifests(split, args.source, classes, args.size, augment_settings(p.augment))
    images, val_images = online_data.images, online_data.validation()[0]

    def augmented(e, rows):  # an online epoch's work, for these rows
        rows_data = OnlineAugmented(images[rows], labels[rows], val_images, val_labels, online_data.settings)
        return rows_data.epoch(e)

    lines = [f"cache build (one-time): {build_s:.1f} s for {n} images x 1 view + {len(val_labels) + 2} plain; "
             f"reading an epoch's views: {read_per_image * 1e3:.2f} ms per image (counted in cached finetune)"]
    head = p.head
    full = new_model(p.backbone, args.precision, head.units, head.dropout, 0, classes)
    if "head_aug" in stages:
        t = time.perf_counter()
        frozen = FrozenSuffix(views, cached_training_model(full, boundary))
        frozen_s = time.perf_counter() - t
        head_model, feats, val_feats = head_submodel(full), frozen.epoch(0)[0], frozen.validation()
        online = new_model(p.backbone, args.precision, head.units, head.dropout, 0, classes)
        for m in (head_model, online):
            compile_classifier(m, len(classes), args.head_lr)
        lines.append(compare("train_head_aug",
                             Side("cached", head_model, lambda e, rows: (feats[rows], labels[rows]), val_feats, n),
                             Side("online", online, augmented, (val_images, val_labels), n), args))
        lines.append(f"train_head_aug: plus a one-time frozen-suffix pass of {frozen_s:.1f} s "
                     f"({frozen_s / n * 1e3:.1f} ms per image-view)")
    if "finetune" in stages:
        start = work / "start.keras"
        save_model(detached(full), start)
        cached = finetune_model(start, p.backbone, args.precision, p.finetune.unfreeze_from)
        cached_model = cached_training_model(cached, boundary)
        online = finetune_model(start, p.backbone, args.precision, p.finetune.unfreeze_from)
        for m in (cached_model, online):
            compile_classifier(m, len(classes), args.finetune_lr)
        lines.append(compare("finetune",
                             Side("cached", cached_model, lambda e, rows: (acts[rows], labels[rows]),
                                  (val_acts, val_labels), n, extra_per_image=read_per_image),
                             Side("online", online, augmented, (val_images, val_labels), n), args))
    views.close()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
