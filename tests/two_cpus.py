"""Run as a script, in a process of its own (test_training_gpus.py does): splits the CPU into two logical
devices before TensorFlow initialises them, then trains train_head and finetune on tiny data under
compute.strategy default (one device) and mirrored (both), stops and resumes a mirrored train_head,
and writes what test_training_gpus.py compares to <folder>/result.json:

    python tests/two_cpus.py <folder>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tlpipe.cli import start

start()  # as a stage: the TensorFlow import hook first
import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
from helpers import feature_file, stored_cats_and_dogs, write_split  # noqa: E402

from tlpipe.config import validate_params  # noqa: E402
from tlpipe.features import viewcache  # noqa: E402
from tlpipe.train.finetune import run_finetune  # noqa: E402
from tlpipe.train.head import run_train_head  # noqa: E402
from tlpipe.train.head_aug import run_head_aug  # noqa: E402
from tlpipe.train.settings import TrainSettings  # noqa: E402
from tlpipe.train.strategy import training_strategy  # noqa: E402

STRATEGIES = ("default", "mirrored")


class Stop(Exception):
    """Stands for a kill after an epoch's checkpoint."""


def params(strategy: str):
    # dropout 0: Keras draws the same dropout mask on every replica, so with dropout the two strategies
    # see different random numbers (docs/training_gpus.md); without, only the sums' order differs.
    return validate_params({
        # The cut named, as features/cut.json would give it; no feature file here for head.standardize.
        "backbone": {"weights": "none", "image_size": 32, "layer": "block5_pool", "pooling": "flatten"},
        "compute": {"batch_size": 4, "strategy": strategy},
        "head": {"units": 8, "dropout": 0.0, "standardize": False, "epochs": 4, "batch_size": 8, "lr": 1e-3, "seed": 1},
        "augment": {"views": 2},
        "head_aug": {"epochs": 1, "batch_size": 4, "lr": 1e-3},
        "finetune": {"epochs": 2, "batch_size": 4, "lr": 1e-4},
    })


def main(out: Path) -> None:
    result = {name: {"replicas": training_strategy(name).num_replicas_in_sync} for name in ("auto", *STRATEGIES)}
    for part, n in (("train", 40), ("validation", 16)):
        feature_file(out / "features" / f"{part}.h5", n, seed=len(part))
    images, rows = stored_cats_and_dogs(out, per_class=6)
    split = write_split(out, {"train": rows[0:4] + rows[6:10], "validation": [rows[4], rows[10]],
                              "test": [rows[5], rows[11]]})
    p = params("default")
    viewcache.build_from_manifests(split, images, out / "views.h5", backbone=p.backbone, augment=p.augment,
                                   compute=p.compute, unfreeze_from=p.finetune.unfreeze_from, progress=False)
    run_head_aug(cache=out / "views.h5", split_dir=split, images_dir=images, model_out=out / "head_aug.keras",
                 metrics_out=out / "head_aug.json", live_dir=out / "live_head_aug", backbone=p.backbone,
                 compute=p.compute, head=p.head, run=TrainSettings.from_params(p.head_aug), augment=p.augment)
    for name in STRATEGIES:
        p = params(name)
        keras.backend.clear_session()
        head = run_train_head(out / "features", out / f"head_{name}.keras", out / f"head_{name}.json",
                              out / f"live_head_{name}", p.head, strategy=name)
        keras.backend.clear_session()
        fine = run_finetune(cache=out / "views.h5", split_dir=split, images_dir=images,
                            model_in=out / "head_aug.keras", model_out=out / f"finetuned_{name}.keras",
                            metrics_out=out / f"finetune_{name}.json", live_dir=out / f"live_finetune_{name}",
                            backbone=p.backbone, compute=p.compute, augment=p.augment, finetune=p.finetune,
                            run=TrainSettings.from_params(p.finetune))
        result[name].update(head=head["history"], finetune=fine["history"])
    # A mirrored run stopped after epoch 2, then resumed from its checkpoint.
    p = params("mirrored")

    def stop(epoch, row):
        if epoch == 2:
            raise Stop

    keras.backend.clear_session()
    try:
        run_train_head(out / "features", out / "head_resumed.keras", out / "head_resumed.json",
                       out / "live_head_resumed", p.head, strategy="mirrored", on_epoch_end=stop)
    except Stop:
        pass
    keras.backend.clear_session()
    resumed = run_train_head(out / "features", out / "head_resumed.keras", out / "head_resumed.json",
                             out / "live_head_resumed", p.head, TrainSettings.from_params(p.head, p.train.model_copy(update={"resume": True})),
                             strategy="mirrored")
    result["mirrored"]["head_resumed"] = resumed["history"]
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
