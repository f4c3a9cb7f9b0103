"""head_aug's rate and length on the view cache (issue 21): the train_head_aug stage's own sweep
(tlpipe.train.lr_search on the views' pooled features, FrozenSuffix) at each epoch budget and patience,
every other setting the project's params. Prints, per budget, each rate's best epoch, validation loss
and accuracy, and the rate `head_aug.lr: auto` would choose. Validation only; nothing is written into
the project.

Run it in a project where `dvc repro viewcache` has run:

    python /path/to/tlpipe/bench/head_aug_lr.py --epochs 30,100 --patience none,10
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).parent))

from common import print_sweep  # noqa: E402  (bench/common.py)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", default="30", help="epoch budgets, comma-separated")
    ap.add_argument("--patience", default="none", help="train.patience values, comma-separated (none: every epoch)")
    ap.add_argument("--lrs", default=None, help="rates, comma-separated (default: lr_search.CANDIDATES)")
    args = ap.parse_args(argv)

    from tlpipe import device
    from tlpipe.config import load_params
    from tlpipe.runtime import threads

    p = load_params()
    device.use(p.compute.device)  # as the stage, before TensorFlow's first op
    threads.configure()  # the stages' fixed thread pool (tlpipe.runtime.threads)
    from tlpipe.data.manifests import read_class_names
    from tlpipe.features.cut import with_cut
    from tlpipe.train import lr_search
    from tlpipe.train.augmented import cache_expect, choose_data
    from tlpipe.train.head_aug import head_maker, model_maker
    from tlpipe.train.settings import TrainSettings

    backbone = with_cut(p.backbone, "features/cut.json")
    classes = read_class_names(Path("data/split/classes.json"))
    # The stage's own model and head (train.head_aug), so each row is what train_head_aug computes.
    fresh = model_maker(backbone, p.compute, p.head, p.head_aug.seed, classes, "features/train.h5")
    make = head_maker(fresh, len(classes))

    lrs = tuple(float(x) for x in args.lrs.split(",")) if args.lrs else lr_search.CANDIDATES
    _, data = choose_data(fresh(), p.augment, p.head_aug.seed, cache="features/views.h5", split_dir="data/split",
                          images_dir="data/images",
                          expect=cache_expect(backbone, p.augment, p.compute, classes))
    steps_per_epoch = -(-data.n_train // int(p.head_aug.batch_size))
    print(f"{Path.cwd()}: {backbone.layer} {backbone.pooling}, {len(classes)} classes, {data.n_train} training "
          f"images x {p.augment.views} views, {steps_per_epoch} steps an epoch")
    with data:
        for epochs in (int(e) for e in args.epochs.split(",")):
            for patience in args.patience.split(","):
                pat = None if patience.strip().lower() == "none" else int(patience)
                run = replace(TrainSettings.from_params(p.head_aug, p.train), epochs=epochs, patience=pat,
                              resume=False)
                t0 = time.perf_counter()
                rows, (chosen, _, _) = lr_search.sweep(make, data, run, lrs)
                print(f"\nepochs {epochs} ({epochs * steps_per_epoch} steps), patience {pat}, sweep "
                      f"{time.perf_counter() - t0:.0f} s, auto chooses {chosen:g}")
                print_sweep(rows, chosen)


if __name__ == "__main__":
    main()
