"""Benchmark: the head's learning rate and length on stored features of several data sets (issue 21).

For each features folder (a project's features/, made by `dvc repro extract`), trains the head as
train_head does (tlpipe.train.head.head_maker, the pipeline's loop and keep-best rule) at each
candidate rate of tlpipe.train.lr_search and each epoch budget, and prints per run the best epoch, its
validation loss and accuracy, and which rate `head.lr: auto` would choose. Validation only.

    python bench/head_lr.py --features /tmp/cd/features /tmp/mk/features --epochs 30,100
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
    ap.add_argument("--features", type=Path, nargs="+", required=True, help="features folders (train.h5, validation.h5)")
    ap.add_argument("--epochs", default="30", help="epoch budgets, comma-separated")
    ap.add_argument("--lrs", default=None, help="rates, comma-separated (default: lr_search.CANDIDATES)")
    ap.add_argument("--batch-size", type=int, default=20)
    args = ap.parse_args(argv)

    from tlpipe.runtime import threads

    threads.configure()  # the stages' fixed thread pool, before TensorFlow's first op (tlpipe.runtime.threads)
    from tlpipe.config import validate_params
    from tlpipe.train import lr_search
    from tlpipe.train.head import head_maker, read_stored_features
    from tlpipe.train.settings import TrainSettings

    lrs = tuple(float(x) for x in args.lrs.split(",")) if args.lrs else lr_search.CANDIDATES
    for folder in args.features:
        data, attrs = read_stored_features(folder)
        (xt, yt), (xv, _) = data.train, data.validation()
        k = len(attrs["class_names"])
        print(f"\n{folder}: {attrs['layer']} {attrs['pooling']}, {k} classes, {len(xt)} training, "
              f"{len(xv)} validation images, {xt.shape[1]} features")
        for epochs in (int(e) for e in args.epochs.split(",")):
            head = validate_params({"head": {"epochs": epochs, "batch_size": args.batch_size}}).head
            run = TrainSettings.from_params(head)
            t0 = time.perf_counter()
            rows, (chosen, _, _) = lr_search.sweep(head_maker(data, k, head, run.seed), data, run, lrs)
            took = time.perf_counter() - t0
            print(f"epochs {epochs} ({epochs * -(-len(yt) // args.batch_size)} steps), sweep {took:.0f} s, "
                  f"auto chooses {chosen:g}")
            print_sweep(rows, chosen)


if __name__ == "__main__":
    main()
