"""Benchmark: training with augmentation on the view cache vs the book's online way.

On real photos (cats_and_dogs_filtered), one run measures:
  - the cache build (viewcache stage): seconds, and seconds per (image x view);
  - seconds per epoch of train_head_aug and of finetune, in cached and in online mode (median
    wall time of the epochs after the first, so graph tracing is not counted; validation included in both),
    and the ratios online/cached (targets: >= 10x head_aug, >= 4x finetune);
  - the break-even: epochs after which building the cache has paid for itself.
The two modes run one after the other, so a swing in the machine's speed between them moves the
ratios; bench/speed.py times them interleaved, round by round, for figures a busy machine can't skew.
With --accuracy (long): test accuracy of head (no augmentation), head_aug and finetuned, both modes,
on the same split; --same-draws adds online training on the cached views' augmentations, to tell
the cache's own cost (float16 activations) from the luck of the augmentation draw.

    python bench/augment.py                       # quick: 100+100 train, 50+50 val, 2 views, ~5 min
    python bench/augment.py --accuracy --train-per-class 500 --epochs 10 --views 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).parent))

from common import DEFAULT_SOURCE, add_model_args, make_split, paired_difference, params_for  # noqa: E402  (bench/common.py)


class EpochClock:
    """Wall time of each finished epoch, from loop.fit's on_epoch_end hook."""

    def __init__(self):
        self.ends = [time.perf_counter()]

    def __call__(self, epoch: int, row: dict) -> None:
        self.ends.append(time.perf_counter())

    def steady(self) -> float:
        """Median seconds of the epochs after the first (which also traces the graphs): one epoch
        slowed by other work on the machine does not decide the figure."""
        import statistics

        return statistics.median(b - a for a, b in zip(self.ends[1:], self.ends[2:]))


def train_stage(full, run, p, d: Path, split: Path, images: Path, name: str, expect: dict,
                draws: str = "fresh") -> tuple[dict, float]:
    """What the train_head_aug and finetune stages do with `full`: choose the data, fit (timing each
    epoch), save to d/<name>.keras. draws="cached" (online mode): each image shows the view cached
    training would show it (train.views.epoch_views) instead of view = epoch, so the two modes differ
    only by the cache's float16 rounding. Returns (fit's summary + "epoch_s", frozen-suffix seconds)."""
    from tlpipe.features.augment import augment_settings
    from tlpipe.train.views import epoch_views
    from tlpipe.model.saved import model_info
    from tlpipe.train.augmented import choose_data, fit_and_save
    from tlpipe.train.online import OnlineAugmented

    if draws == "cached":
        info = model_info(full)
        model, data = full, OnlineAugmented.from_manifests(split, images, info["class_names"], info["image_size"],
                                                           augment_settings(p.augment))
        data.views = lambda e: epoch_views(len(data.labels), p.augment.views, run.seed, e)
    else:
        model, data = choose_data(full, p.augment, run.seed, cache=d / "views.h5", split_dir=split,
                                  images_dir=images, expect=expect)
    clock = EpochClock()
    with data:
        result = fit_and_save(full, model, data, run, live_dir=d / f"live_{name}", model_path=d / f"{name}.keras",
                              on_epoch_end=clock)
    result["epoch_s"] = clock.steady()
    return result, getattr(data, "seconds", 0.0)


def run_mode(args, work: Path, split: Path, mode: str, tag: str, views=None, augment=None,
             finetune: bool = True, draws: str = "fresh") -> dict:
    """Build the cache (a marker in online mode), train head_aug and finetune; timings and val accuracy.
    draws="cached" (online mode): train on the cached views' augmentations, not fresh ones."""
    import keras

    from tlpipe.data.manifests import read_class_names
    from tlpipe.features.viewcache import build_from_manifests
    from tlpipe.train.augmented import cache_expect
    from tlpipe.train.settings import TrainSettings
    from tlpipe.model.saved import model_info
    from tlpipe.train.models import finetune_model, new_model

    p = params_for(args, mode, views, augment)
    d = work / tag
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    keras.backend.clear_session()
    t0 = time.perf_counter()
    build_from_manifests(split, args.source, d / "views.h5", backbone=p.backbone, augment=p.augment,
                         compute=p.compute, unfreeze_from=p.finetune.unfreeze_from)
    out["cache_s"] = time.perf_counter() - t0
    classes = read_class_names(split / "classes.json")
    expect = cache_expect(p.backbone, p.augment, p.compute, classes)
    keras.backend.clear_session()
    run = TrainSettings.from_params(p.head_aug)
    full = new_model(p.backbone, p.compute.precision, p.head.units, p.head.dropout, run.seed, classes)
    m, out["frozen_suffix_s"] = train_stage(full, run, p, d, split, args.source, "head_aug", expect, draws)
    out["head_aug_epoch_s"], out["head_aug_val_acc"] = m["epoch_s"], m["last"]["val_accuracy"]
    if finetune:
        keras.backend.clear_session()
        full = finetune_model(d / "head_aug.keras", p.backbone, p.compute.precision, p.finetune.unfreeze_from)
        m, _ = train_stage(full, TrainSettings.from_params(p.finetune), p, d, split, args.source, "finetuned",
                           {**expect, "unfreeze_from": model_info(full)["trainable_from"]}, draws)
        out["finetune_epoch_s"], out["finetune_val_acc"] = m["epoch_s"], m["last"]["val_accuracy"]
    print(f"# {tag}: " + json.dumps({k: round(v, 3) for k, v in out.items()}), file=sys.stderr, flush=True)
    return out


def test_correct(model_path: Path, images, labels) -> "np.ndarray":
    """Per test image: 1 if the model classifies it right, else 0."""
    import numpy as np

    from tlpipe.model.predict import class_probabilities
    from tlpipe.model.saved import load_model

    pred = class_probabilities(load_model(model_path).predict(images, verbose=0, batch_size=32)).argmax(1)
    return (pred == np.asarray(labels)).astype(np.int8)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=Path(DEFAULT_SOURCE))
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--val-per-class", type=int, default=50)
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run (>= 2: the last one is timed)")
    add_model_args(ap)
    ap.add_argument("--accuracy", action="store_true", help="also train 'head' and report test accuracies")
    ap.add_argument("--same-draws", action="store_true",
                    help="with --accuracy: also train online on the cached views' augmentations, which "
                         "separates the cache's own cost (float16) from which augmentations were drawn")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.same_draws and not args.accuracy:
        ap.error("--same-draws needs --accuracy")
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (the first epoch includes graph tracing)")
    if not args.source.is_dir():
        raise SystemExit(f"{args.source}: not found; pass --source (a folder with train/ and validation/)")
    work = args.work or Path(tempfile.mkdtemp(prefix="tlpipe-bench-augment-"))
    split = make_split(args.source, work, args.train_per_class, args.val_per_class, args.test_per_class)
    n_train = 2 * args.train_per_class
    print(f"# {n_train} train, {2 * args.val_per_class} val, {2 * args.test_per_class} test images, "
          f"{args.size}px, {args.weights}, {args.precision}, views {args.views}, {args.epochs} epochs; "
          f"{os.cpu_count()} CPUs", file=sys.stderr)

    cached = run_mode(args, work, split, "cached", "cached")
    online = run_mode(args, work, split, "online", "online")
    r_head = online["head_aug_epoch_s"] / cached["head_aug_epoch_s"]
    r_fine = online["finetune_epoch_s"] / cached["finetune_epoch_s"]
    r_head_amortized = online["head_aug_epoch_s"] / (cached["head_aug_epoch_s"] + cached["frozen_suffix_s"] / args.epochs)
    saved = (online["head_aug_epoch_s"] - cached["head_aug_epoch_s"]) + \
            (online["finetune_epoch_s"] - cached["finetune_epoch_s"])
    build = cached["cache_s"] - online["cache_s"]  # online writes only the marker
    n_plain = 2 * (args.val_per_class + args.test_per_class)  # validation and test, unaugmented
    per_view = build / (n_train * args.views + n_plain)
    lines = [
        f"cache build: {build:.1f} s ({per_view * 1000:.0f} ms per image-view; "
        f"{n_train} images x {args.views} views + {n_plain} plain)",
        f"train_head_aug s/epoch: cached {cached['head_aug_epoch_s']:.2f}, online {online['head_aug_epoch_s']:.2f}"
        f" -> {r_head:.1f}x (target >= 10x); plus a one-time frozen-suffix pass of "
        f"{cached['frozen_suffix_s']:.1f} s at the start of cached training "
        f"(amortized over {args.epochs} epochs: {r_head_amortized:.1f}x)",
        f"finetune s/epoch:       cached {cached['finetune_epoch_s']:.2f}, online {online['finetune_epoch_s']:.2f}"
        f" -> {r_fine:.1f}x (target >= 4x)",
        f"break-even: the cache pays for itself after {build / saved:.2f} epochs of head_aug + finetune each "
        f"({build / (online['head_aug_epoch_s'] - cached['head_aug_epoch_s']):.2f} epochs of head_aug alone)",
    ]
    if args.accuracy:
        run_mode(args, work, split, "cached", "head", views=1, finetune=False,  # the plain head: work/head
                         augment={k: 0.0 for k in ("rotation_range", "width_shift_range", "height_shift_range",
                                                   "shear_range", "zoom_range")} | {"horizontal_flip": False})
        from tlpipe.data.manifests import manifest_rows, read_class_names
        from tlpipe.train.online import load_images

        modes = ("cached", "online")
        if args.same_draws:
            run_mode(args, work, split, "online", "online_same", draws="cached")
            modes += ("online_same",)
        files, labels, _ = manifest_rows(split / "test.csv", args.source, read_class_names(split / "classes.json"))
        images = load_images(files, args.size)
        correct = {"head": test_correct(work / "head" / "head_aug.keras", images, labels)}
        for mode in modes:
            for name in ("head_aug", "finetuned"):
                correct[f"{name} ({mode})"] = test_correct(work / mode / f"{name}.keras", images, labels)
        lines.append(f"test accuracy ({len(labels)} images): "
                     + ", ".join(f"{k} {v.mean():.3f}" for k, v in correct.items()))
        for name in ("head_aug", "finetuned"):
            diff, lo, hi = paired_difference(correct[f"{name} (cached)"], correct[f"{name} (online)"])
            lines.append(f"{name}: cached - online = {100 * diff:+.1f} points "
                         f"(95% paired bootstrap interval {100 * lo:+.1f} .. {100 * hi:+.1f}; target within 1)")
            if args.same_draws:  # the cache's own cost, then what a different draw of augmentations does
                for a, b in (("cached", "online_same"), ("online", "online_same")):
                    x, y = correct[f"{name} ({a})"], correct[f"{name} ({b})"]
                    diff, lo, hi = paired_difference(x, y)
                    lines.append(f"{name}: {a} - {b} = {100 * diff:+.1f} points (95% interval {100 * lo:+.1f} .. "
                                 f"{100 * hi:+.1f}); they disagree on {int((x != y).sum())} of {len(x)} images")
        for mode in ("cached", "online"):
            diff, lo, hi = paired_difference(correct[f"finetuned ({mode})"], correct["head"])
            lines.append(f"finetuned ({mode}) - head = {100 * diff:+.1f} points "
                         f"(95% interval {100 * lo:+.1f} .. {100 * hi:+.1f}; target > 0)")
        if args.work:
            import numpy as np
            np.savez(work / "test_correct.npz", **{k.replace(" ", "_"): v for k, v in correct.items()})
        del plain
    print("\n".join(lines))


if __name__ == "__main__":
    main()
