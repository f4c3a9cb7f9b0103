"""Benchmark: does the head do better on validation when it standardises its input (head.standardize)?

Reads a pipeline run's stored features (features/train.h5, validation.h5: the cut the probe chose)
and trains the book's head (Dense 256 relu, Dropout 0.5, RMSprop, batch 20, seed 42) with and without
a Normalization layer adapted on the training features, at each learning rate, through the
train_head stage's own code (tlpipe.train.head.run_train_head: the pipeline's training loop, its
epoch order and seeding), so the `standardize: yes` row at the pipeline's lr is what train_head
computes from the same features with the same head params. Prints, per run, the best epoch by
validation loss (train.keep: best), its validation accuracy and loss, and the first epoch's training
loss. Validation only: the test split is not read.

    python bench/standardize.py --features /path/to/project/features --lrs 2e-5,1e-4,1e-3 --epochs 30
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=Path, default=Path("features"), help="folder of train.h5 and validation.h5")
    ap.add_argument("--lrs", default="2e-5,1e-4,1e-3", help="learning rates, comma-separated")
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args(argv)

    import tempfile

    from tlpipe.runtime import threads

    threads.configure()  # the stages' fixed thread pool, before TensorFlow's first op (tlpipe.runtime.threads)
    from tlpipe.config import validate_params
    from tlpipe.train.head import read_stored_features, run_train_head

    data, attrs = read_stored_features(args.features)
    (xt, _), (xv, _) = data.train, data.validation()
    print(f"{attrs['layer']} {attrs['pooling']}: {len(xt)} training, {len(xv)} validation images, {xt.shape[1]} features")
    print("| standardize | lr | best epoch | val acc at best | val loss at best | first-epoch train loss |")
    print("|---|---|---|---|---|---|")
    for standardize in (False, True):
        for lr in (float(x) for x in args.lrs.split(",")):
            head = validate_params({"head": {"units": 256, "dropout": 0.5, "standardize": standardize, "lr": lr,
                                             "epochs": args.epochs, "batch_size": 20, "seed": 42}}).head
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                result = run_train_head(args.features, tmp / "head.keras", tmp / "metrics.json", tmp / "live",
                                        head)  # train's defaults: keep the best epoch
            h, best = result["history"], result["best_epoch"]  # best: train.keep's rule (tlpipe.history)
            print(f"| {'yes' if standardize else 'no'} | {lr:g} | {best} | {h[best - 1]['val_accuracy']:.1%} | "
                  f"{h[best - 1]['val_loss']:.3f} | {h[0]['train_loss']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
