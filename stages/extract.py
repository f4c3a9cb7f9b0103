"""Extract stage: the backbone's features of every split, as features/{train,validation,test}.h5."""

import argparse

from tlpipe.cli import run_stage
from tlpipe.config import load_params


def main(argv=None):
    ap = argparse.ArgumentParser(description="Run the split images through the convolutional base and "
                                             "store its features (resumable if interrupted).")
    ap.add_argument("--split-dir", default="data/split", help="folder of {train,validation,test}.csv and classes.json")
    ap.add_argument("--images", default="data/images", help="the image store the manifests point into")
    ap.add_argument("--out", default="features", help="folder for {train,validation,test}.h5")
    args = ap.parse_args(argv)
    params = load_params()

    from tlpipe.features.engine import Engine
    from tlpipe.features.extract import BaseSpec, extract_splits

    extract_splits(args.split_dir, args.images, args.out, BaseSpec.from_params(params.backbone),
                   batch_size=params.compute.batch_size, precision=params.compute.precision,
                   engine=Engine.from_params(params.compute))


if __name__ == "__main__":
    run_stage(main)
