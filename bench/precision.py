"""Benchmark: compute.precision bfloat16 (or mixed_float16 on a GPU) against float32, speed and accuracy.

Both in one run (--against picks the precision compared).

On the same split of real photos, for each precision:
  - the extract stage's real path (files -> tf.data -> feature model -> HDF5) over every split,
    images/s (the models are built and traced before the clock starts; the precisions take turns
    split by split);
  - the train_head stage on those features (same head seed and settings), then its test accuracy;
  - fine-tuning's training step: the model finetune trains on the view cache at the cut block4_pool
    (block 4 and the head, on block3_pool activations), images/s, the two
    precisions interleaved over --rounds rounds, the fastest of each counting (the machine's speed
    jumps between levels from minute to minute: docs/benchmarks.md).
Also prints how far the other precision's features are from the float32 ones (relative L2 error), and the
paired difference of test accuracy with a 95% bootstrap interval.

    python bench/precision.py --train-per-class 200 --val-per-class 50 --test-per-class 150
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).parent))

from common import DEFAULT_SOURCE, add_base_args, extract_split, make_split, paired_difference  # noqa: E402  (bench/common.py)


def extract(split: Path, source: Path, work: Path, spec, precisions, batch_size: int) -> dict:
    """{precision: seconds to extract every split}, features to work/<precision>/. The precisions take
    turns split by split (models built and traced beforehand), so a change in the machine's speed
    part-way falls on both."""
    import numpy as np

    from tlpipe.data.manifests import SPLITS, read_class_names
    from tlpipe.features.extract import Extractor

    classes = read_class_names(split / "classes.json")
    extractors = {p: Extractor(spec, p) for p in precisions}
    for e in extractors.values():
        e(np.zeros((batch_size, spec.image_size, spec.image_size, 3), np.float32))  # trace
    seconds = dict.fromkeys(precisions, 0.0)
    for name in SPLITS:
        for precision, extractor in extractors.items():
            t0 = time.perf_counter()
            extract_split(split / f"{name}.csv", source, work / precision / f"{name}.h5", extractor, classes,
                          batch_size)
            seconds[precision] += time.perf_counter() - t0
    return seconds


def train_step_rates(precisions, size: int, rounds: int, batch: int = 20, steps: int = 5) -> dict:
    """{precision: training images/s} of what finetune trains at the cut block4_pool (the pipeline's own
    models: train.models.new_model, block 4 unfrozen, cached_training_model from block3_pool) under
    each precision (the fastest round)."""
    import numpy as np

    from tlpipe.config import validate_params
    from tlpipe.model.saved import set_trainable_from
    from tlpipe.train.compile import compile_classifier
    from tlpipe.train.models import cached_training_model, new_model

    backbone = validate_params({"backbone": {"weights": "none", "image_size": size, "layer": "block4_pool",
                                             "pooling": "avg"}}).backbone
    models = {}
    for precision in precisions:
        full = new_model(backbone, precision, 256, 0.5, 0, ["a", "b"])
        set_trainable_from(full, "block4_conv1")
        models[precision] = compile_classifier(cached_training_model(full, "block3_pool"), 2, 1e-5)
    boundary = tuple(next(iter(models.values())).input_shape[1:])
    rng = np.random.default_rng(0)
    xb = rng.random((batch, *boundary), dtype=np.float32)
    yb = (np.arange(batch) % 2).astype(np.float32)
    best = {p: float("inf") for p in precisions}
    for m in models.values():
        m.train_on_batch(xb, yb)  # trace
    for _ in range(rounds):
        for precision, m in models.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                m.train_on_batch(xb, yb)
            best[precision] = min(best[precision], time.perf_counter() - t0)
    return {p: batch * steps / s for p, s in best.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=Path(DEFAULT_SOURCE))
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--val-per-class", type=int, default=50)
    ap.add_argument("--test-per-class", type=int, default=150)
    add_base_args(ap)
    ap.add_argument("--epochs", type=int, default=30, help="head epochs (params.yaml default: 30)")
    ap.add_argument("--head-lr", type=float, default=2e-5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--against", default="bfloat16", choices=("bfloat16", "mixed_float16"),
                    help="the precision compared with float32 (mixed_float16 needs a GPU)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the fine-tuning step timing")
    args = ap.parse_args(argv)
    if not args.source.is_dir():
        raise SystemExit(f"{args.source}: not found; pass --source (a folder with train/ and validation/)")

    import keras
    import numpy as np

    from tlpipe.config import validate_params
    from tlpipe.evaluate.run import predict_model
    from tlpipe.features.extract import BaseSpec
    from tlpipe.features.featurefile import read_features
    from tlpipe.train.head import run_train_head
    from tlpipe.model.predict import class_probabilities

    work = args.work or Path(tempfile.mkdtemp(prefix="tlpipe-bench-precision-"))
    split = make_split(args.source, work, args.train_per_class, args.val_per_class, args.test_per_class)
    layer = None if args.layer in ("null", "none") else args.layer
    p = validate_params({"backbone": {"name": "vgg16", "weights": args.weights, "layer": layer,
                                      "pooling": args.pooling, "image_size": args.size},
                         "head": {"epochs": args.epochs, "lr": args.head_lr}})
    spec = BaseSpec.from_params(p.backbone)
    n = 2 * (args.train_per_class + args.val_per_class + args.test_per_class)
    print(f"# {n} images ({2 * args.train_per_class} train, {2 * args.test_per_class} test), {args.size}px, "
          f"{args.weights}, head {args.epochs} epochs lr {args.head_lr}; {os.cpu_count()} CPUs", file=sys.stderr)

    result = {}
    times = extract(split, args.source, work, spec, ("float32", args.against), args.batch_size)
    for precision, seconds in times.items():
        keras.backend.clear_session()
        feats = work / precision
        run_train_head(feats, work / f"head_{precision}.keras", work / f"head_{precision}.json",
                       work / f"live_{precision}", p.head)
        test = read_features(feats / "test.h5")
        y, _, raw, how = predict_model(work / f"head_{precision}.keras", test, None, test[3]["class_names"])
        assert how == "features"
        correct = class_probabilities(raw).argmax(1) == y
        result[precision] = {"seconds": seconds, "correct": correct.astype(np.int8),
                             "train": read_features(feats / "train.h5")[0].astype(np.float64)}
        print(f"# {precision}: {n / seconds:.2f} images/s, test accuracy {correct.mean():.3f}", file=sys.stderr)

    other = args.against
    keras.backend.clear_session()
    rates = train_step_rates(("float32", other), args.size, args.rounds)
    f32, bf16 = result["float32"], result[other]
    rel = np.linalg.norm(bf16["train"] - f32["train"]) / np.linalg.norm(f32["train"])
    diff, lo, hi = paired_difference(bf16["correct"], f32["correct"])
    print(f"extract images/s: float32 {n / f32['seconds']:.2f}, {other} {n / bf16['seconds']:.2f} "
          f"-> {other} is {f32['seconds'] / bf16['seconds']:.2f}x the speed of float32")
    print(f"fine-tuning step (block 4 + head) images/s: float32 {rates['float32']:.1f}, {other} "
          f"{rates[other]:.1f} -> {other} is {rates[other] / rates['float32']:.2f}x the speed of float32")
    print(f"features: {other} vs float32 relative L2 error {rel:.4f}")
    print(f"test accuracy ({len(f32['correct'])} images): float32 {f32['correct'].mean():.3f}, "
          f"{other} {bf16['correct'].mean():.3f}; {other} - float32 = {100 * diff:+.1f} points "
          f"(95% paired bootstrap interval {100 * lo:+.1f} .. {100 * hi:+.1f})")


if __name__ == "__main__":
    main()
