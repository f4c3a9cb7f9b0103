"""Fine-tuning's first epochs with and without a warm-up of the rate (docs/results.md, "Fine-tuning's
warm-up"): the finetune stage's own code (train.finetune.run_finetune) from the project's start model,
once per warm-up length, every other setting the project's params; prints validation loss and accuracy
after each epoch, and the seconds per epoch. Nothing is written into the project.

Run it in a project where `dvc repro train_head_aug` (or train_head, for finetune.from: head) has run:

    python /path/to/tlpipe/bench/finetune_warmup.py --steps 0 20 75 --epochs 2
    python /path/to/tlpipe/bench/finetune_warmup.py --steps 0 --epochs 4 --lr 1e-5
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 20], help="warm-up lengths in optimizer steps")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run")
    ap.add_argument("--lr", type=float, default=None, help="fine-tuning's rate (default: the project's finetune.lr)")
    args = ap.parse_args(argv)

    from tlpipe import device
    from tlpipe.config import load_params
    from tlpipe.runtime import threads
    from tlpipe.features.cut import with_cut
    from tlpipe.train.finetune import run_finetune
    from tlpipe.train.settings import TrainSettings

    p = load_params()
    device.use(p.compute.device)  # as the stage, before TensorFlow's first op
    threads.configure()  # the stages' fixed thread pool (tlpipe.runtime.threads)
    start = f"models/{p.finetune.from_}.keras"
    rows = []
    for steps in args.steps:
        times = [time.perf_counter()]
        with tempfile.TemporaryDirectory() as tmp:
            run = replace(TrainSettings.from_params(p.finetune, p.train), epochs=args.epochs, warmup_steps=steps)
            if args.lr is not None:
                run = replace(run, lr=args.lr)
            result = run_finetune(cache="features/views.h5", split_dir="data/split", images_dir="data/images",
                                  model_in=start, model_out=f"{tmp}/m.keras", metrics_out=f"{tmp}/m.json",
                                  live_dir=None, backbone=with_cut(p.backbone, "features/cut.json"),
                                  compute=p.compute, augment=p.augment, finetune=p.finetune, run=run,
                                  start_metrics=f"metrics/train_{p.finetune.from_}.json",
                                  on_epoch_end=lambda e, row: times.append(time.perf_counter()))
        per_epoch = (times[-1] - times[1]) / max(1, len(times) - 2) if len(times) > 2 else times[-1] - times[0]
        rows.append((steps, per_epoch, result["history"]))
        print(f"warm-up {steps} steps done", flush=True)

    rate = f"lr {args.lr:g}" if args.lr is not None else f"finetune.lr {p.finetune.lr}"
    print(f"\nstart model {start}; {rate}; {args.epochs} epochs each; val loss / val accuracy after each epoch\n")
    print("| warm-up steps | s per epoch (after the first) | " + " | ".join(f"epoch {e + 1}" for e in range(args.epochs)) + " |")
    print("|---|---|" + "---|" * args.epochs)
    for steps, per_epoch, history in rows:
        cells = [f"{r['val_loss']:.3f} / {100 * r['val_accuracy']:.1f}%" for r in history]
        print(f"| {steps} | {per_epoch:.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
