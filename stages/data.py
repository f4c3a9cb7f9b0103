"""Data stage: fetch `data.source`, decode every image once into the store, split it per class.

    python stages/data.py --images data/images --out data/split
"""

import argparse

from tlpipe.cli import run_stage
from tlpipe.config import load_params
from tlpipe.runtime.log import log
from tlpipe.data.sources import resolve_source
from tlpipe.data.manifests import SPLITS
from tlpipe.data.split import build_dataset


def main(argv=None):
    ap = argparse.ArgumentParser(description="Fetch, decode, de-duplicate and split the image source.")
    ap.add_argument("--images", default="data/images", help="content-addressed image store to write")
    ap.add_argument("--out", default="data/split", help="folder for the split manifests and summary")
    args = ap.parse_args(argv)
    p = load_params().data

    root = resolve_source(p.source, p.sha256)
    summary = build_dataset(root, args.images, args.out, split=p.split, seed=p.seed,
                            min_per_split=p.min_per_split)
    per_split = ", ".join(f"{summary['totals'][s]} {s}" for s in SPLITS)
    log.info(f"data: {len(summary['classes'])} classes, {per_split}; {summary['rejected']} rejected "
             f"-> {args.images}, {args.out}")


if __name__ == "__main__":
    run_stage(main)
