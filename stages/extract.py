"""Extract stage: the backbone's features of every split, as features/{train,validation,test}.h5, and the
cut they were taken at (features/cut.json; chosen by a linear probe on validation when backbone.layer or
backbone.pooling is auto)."""

import argparse

from tlpipe.cli import run_stage
from tlpipe import device
from tlpipe.config import load_params


def main(argv=None):
    ap = argparse.ArgumentParser(description="Run the split images through the convolutional base and "
                                             "store its features (resumable if interrupted).")
    ap.add_argument("--split-dir", default="data/split", help="folder of {train,validation,test}.csv and classes.json")
    ap.add_argument("--images", default="data/images", help="the image store the manifests point into")
    ap.add_argument("--out", default="features", help="folder for {train,validation,test}.h5 and cut.json")
    ap.add_argument("--metrics", default="metrics/extract.json", help="the cut and its probe score (JSON)")
    args = ap.parse_args(argv)
    params = load_params()
    device.use(params.compute.device)  # before TensorFlow's first op

    from tlpipe.atomic import write_json
    from tlpipe.features import cut
    from tlpipe.features.engine import Engine
    from tlpipe.features.extract import BaseSpec
    from tlpipe.features.all_splits import extract_splits

    extract_splits(args.split_dir, args.images, args.out, BaseSpec.from_params(params.backbone),
                   batch_size=params.compute.batch_size, precision=params.compute.precision,
                   engine=Engine.from_params(params.compute))
    write_json(args.metrics, cut.metrics(f"{args.out}/{cut.CUT_FILE}"))


if __name__ == "__main__":
    run_stage(main)
