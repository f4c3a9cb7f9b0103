"""Benchmark: does the head do better on validation when it standardises its input (head.standardize)?

Reads a pipeline run's stored features (features/train.h5, validation.h5: the cut the probe chose)
and trains the book's head (Dense 256 relu, Dropout 0.5, RMSprop, batch 20, seed 42) with and without
a Normalization layer adapted on the training features, at each learning rate. Prints, per run, the
best epoch by validation loss (train.keep: best), its validation accuracy and loss, and the first
epoch's training loss. Validation only: the test split is not read.

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

    import keras

    from tlpipe.features.featurefile import read_features
    from tlpipe.history import best_index
    from tlpipe.model.head import build_head, feature_stats
    from tlpipe.train.compile import compile_classifier

    xt, yt, _, attrs = read_features(args.features / "train.h5")
    xv, yv, _, _ = read_features(args.features / "validation.h5")
    print(f"{attrs['layer']} {attrs['pooling']}: {len(xt)} training, {len(xv)} validation images, {xt.shape[1]} features")
    print("| standardize | lr | best epoch | val acc at best | val loss at best | first-epoch train loss |")
    print("|---|---|---|---|---|---|")
    for standardize in (False, True):
        for lr in (float(x) for x in args.lrs.split(",")):
            keras.utils.set_random_seed(42)
            model = compile_classifier(build_head(xt.shape[1], 2, 256, 0.5, seed=42,
                                                  stats=feature_stats(xt) if standardize else None), 2, lr)
            h = model.fit(xt, yt, batch_size=20, epochs=args.epochs, validation_data=(xv, yv), verbose=0).history
            best = best_index(h["val_loss"])  # the rule train.keep: best applies
            print(f"| {'yes' if standardize else 'no'} | {lr:g} | {best + 1} | {h['val_accuracy'][best]:.1%} | "
                  f"{h['val_loss'][best]:.3f} | {h['loss'][0]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
