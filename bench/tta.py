"""Test-time augmentation on validation (issue 21): each saved model's validation accuracy and log loss
on the plain images, and with its probabilities averaged over the image and its mirror image (the
horizontal flip the training views use). Validation only; nothing is written into the project.

Run it in a project where the training stages have run:

    python /path/to/tlpipe/bench/tta.py --models head_aug finetuned
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["head", "head_aug", "finetuned"], help="models/<name>.keras")
    args = ap.parse_args(argv)

    from tlpipe import device
    from tlpipe.config import load_params
    from tlpipe.runtime import threads

    p = load_params()
    device.use(p.compute.device)  # as the stages, before TensorFlow's first op
    threads.configure()
    import numpy as np
    import tensorflow as tf

    from tlpipe.data.manifests import manifest_rows, read_class_names
    from tlpipe.evaluate.metrics import log_loss
    from tlpipe.features.inputs import image_dataset
    from tlpipe.model.outputs import class_probabilities
    from tlpipe.model.saved import load_model, model_info

    classes = read_class_names(Path("data/split/classes.json"))
    files, labels, _ = manifest_rows("data/split/validation.csv", "data/images", classes)
    y = np.asarray(labels)
    print("| model | plain: val acc | val log loss | + mirror: val acc | val log loss | s |\n|---|---|---|---|---|---|")
    for name in args.models:
        model = load_model(f"models/{name}.keras")
        infer = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        size = int(model_info(model)["image_size"])
        t0 = time.perf_counter()
        plain, mirror = [], []
        for batch in image_dataset(files, size, 32, None):
            plain.append(infer(batch).numpy())
            mirror.append(infer(tf.image.flip_left_right(batch)).numpy())
        pp = class_probabilities(np.concatenate(plain))
        pm = class_probabilities(np.concatenate(mirror))
        cells = []
        for prob in (pp, (pp + pm) / 2):
            acc = float(np.mean(prob.argmax(axis=1) == y))
            cells += [f"{acc:.1%}", f"{log_loss(y, prob):.3f}"]
        print(f"| {name} | " + " | ".join(cells) + f" | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
