"""Benchmark: what `backbone.layer: auto` costs over extracting one named cut.

On the same split of real photos, in one run: the extract step with the cut named (block5_pool
flatten, the book's) and with layer and pooling `auto` (one forward pass storing block3/4/5_pool,
then nine linear probes, then the chosen cut assembled). Prints both wall times, their ratio
(issue 12's target: at most 1.3), the probe's table and its choice.

    python bench/probe.py --train 150 --val 75 --test 75
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_SOURCE, make_split  # noqa: E402  (bench/common.py)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=Path(DEFAULT_SOURCE), help="cats_and_dogs_filtered-style folder")
    ap.add_argument("--train", type=int, default=150, help="training images per class")
    ap.add_argument("--val", type=int, default=75, help="validation images per class")
    ap.add_argument("--test", type=int, default=75, help="test images per class")
    ap.add_argument("--weights", default="hed-bsds500")
    ap.add_argument("--size", type=int, default=150, help="backbone.image_size")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--keep-features", type=Path, default=None,
                    help="copy the auto run's features (train/validation/test .h5 and shards, cut.json) here")
    ap.add_argument("--rounds", type=int, default=2,
                    help="named/auto rounds, interleaved; the fastest of each counts (the first pays TF's warm-up)")
    args = ap.parse_args(argv)

    from tlpipe.features import cut
    from tlpipe.features.extract import BaseSpec
    from tlpipe.features.all_splits import extract_splits

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        split = make_split(args.source, tmp, args.train, args.val, args.test)
        n = 2 * (args.train + args.val + args.test)
        seconds = {"named": float("inf"), "auto": float("inf")}
        for r in range(args.rounds):
            for name, layer, pooling in (("named", "block5_pool", "flatten"), ("auto", "auto", "auto")):
                spec = BaseSpec("vgg16", args.weights, layer, pooling, args.size)
                t = time.perf_counter()
                extract_splits(split, args.source, tmp / f"{name}{r}", spec, batch_size=args.batch_size)
                seconds[name] = min(seconds[name], time.perf_counter() - t)
        chosen = cut.read_cut(tmp / "auto0" / "cut.json")
        if args.keep_features:
            import shutil

            shutil.copytree(tmp / "auto0", args.keep_features, dirs_exist_ok=True)
    print(f"{n} images ({args.train}/{args.val}/{args.test} per class), weights {args.weights}")
    print(f"extract, cut named (block5_pool flatten): {seconds['named']:.1f} s (fastest of {args.rounds})")
    print(f"extract, layer and pooling auto:          {seconds['auto']:.1f} s (fastest of {args.rounds})")
    print(f"ratio auto / named: {seconds['auto'] / seconds['named']:.2f} (target <= 1.3)")
    for row in chosen["probe"]:
        print(f"  {row['layer']:12s} {row['pooling']:8s} dim {row['dim']:6d}  val_accuracy {row['val_accuracy']:.4f}"
              f"  val_loss {row['val_loss']:.4f}")
    print("chosen:", json.dumps({k: chosen[k] for k in ("layer", "pooling")}))


if __name__ == "__main__":
    main()
