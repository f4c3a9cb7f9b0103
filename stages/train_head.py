"""train_head stage: the book's densely connected classifier on the stored features (no augmentation)."""

import argparse

from tlpipe.cli import run_stage
from tlpipe import device
from tlpipe.config import load_params


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train the dense head on features/{train,validation}.h5 and save "
                                             "the full classifier (base + head) as one .keras file.")
    ap.add_argument("--features", default="features", help="folder of train.h5, validation.h5 and cut.json")
    ap.add_argument("--model", default="models/head.keras", help="the full model written (atomically)")
    ap.add_argument("--metrics", default="metrics/train_head.json", help="final train/val metrics (JSON)")
    ap.add_argument("--live", default="dvclive/train_head", help="dvclive folder for per-epoch metrics")
    args = ap.parse_args(argv)
    params = load_params()
    device.use(params.compute.device)  # before TensorFlow's first op

    from tlpipe.features.cut import CUT_FILE, with_cut
    from tlpipe.train.head import run_train_head
    from tlpipe.train.settings import TrainSettings

    run_train_head(args.features, args.model, args.metrics, args.live, params.head,
                   TrainSettings.from_params(params.head, params.train),
                   backbone=with_cut(params.backbone, f"{args.features}/{CUT_FILE}"), strategy=params.compute.strategy)


if __name__ == "__main__":
    run_stage(main)
