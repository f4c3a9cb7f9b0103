"""Benchmark: how much head.standardize shrinks each feature's variance toward the mean (VARIANCE_SHRINK).

Reads a pipeline run's stored features (features/train.h5, validation.h5) and, for each shrink value,
standardises them as the head does (tlpipe.model.dense_head.feature_stats with that shrink) and runs head.lr: auto's
sweep (tlpipe.train.lr_search: the head trained at every candidate rate by the pipeline's loop, with
params.yaml's head settings). Prints, per shrink value, the largest validation z-score the statistics
give and the sweep's table; the rate auto keeps is the row of lowest validation loss. Validation only.

    python bench/variance_shrink.py --features /path/to/project/features --shrinks 0,0.1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).parent))

from common import print_sweep  # noqa: E402  (bench/common.py)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=Path, default=Path("features"), help="folder of train.h5 and validation.h5")
    ap.add_argument("--shrinks", default="0,0.1", help="VARIANCE_SHRINK values, comma-separated")
    ap.add_argument("--epochs", type=int, default=None, help="head epochs (default: params.yaml's)")
    ap.add_argument("--lrs", default=None, help="rates to sweep, comma-separated (default: lr_search.CANDIDATES)")
    args = ap.parse_args(argv)

    from tlpipe.runtime import threads

    threads.configure()  # the stages' fixed thread pool, before TensorFlow's first op (tlpipe.runtime.threads)
    import numpy as np

    from tlpipe.config import validate_params
    from tlpipe.model import dense_head
    from tlpipe.train import lr_search
    from tlpipe.train.head import head_maker, read_stored_features
    from tlpipe.train.settings import TrainSettings

    data, attrs = read_stored_features(args.features)
    (xt, _), (xv, _) = data.train, data.validation()
    k = len(attrs["class_names"])
    print(f"{args.features}: {attrs['layer']} {attrs['pooling']}, {k} classes, {len(xt)} training, "
          f"{len(xv)} validation images, {xt.shape[1]} features")
    head = validate_params({"head": {"lr": "auto", **({"epochs": args.epochs} if args.epochs else {})}}).head
    run = TrainSettings.from_params(head)
    lrs = None if args.lrs is None else [float(v) for v in args.lrs.split(",")]
    for shrink in (float(v) for v in args.shrinks.split(",")):
        mean, var = (np.asarray(v) for v in dense_head.feature_stats(xt, shrink))
        z = np.abs((xv - mean) / np.sqrt(var))
        t0 = time.perf_counter()
        rows, (chosen, _, _) = lr_search.sweep(head_maker(data, k, head, run.seed, shrink), data, run, lrs)
        mark = " (the pipeline's)" if shrink == dense_head.VARIANCE_SHRINK else ""
        print(f"\nshrink {shrink:g}{mark}: validation |z| max {z.max():.0f}, 99.9th percentile "
              f"{np.quantile(z, 0.999):.1f}; sweep {time.perf_counter() - t0:.0f} s, auto keeps {chosen:g}")
        print_sweep(rows, chosen)


if __name__ == "__main__":
    main()
