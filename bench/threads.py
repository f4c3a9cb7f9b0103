"""Benchmark: TensorFlow's fixed intra-op pool (tlpipe.runtime.threads, what every stage now runs with) against
its default (one thread per core), in speed and in bytes, on real-size photos.

Each configuration runs in a process of its own (the pool's size is fixed when TensorFlow starts),
taking turns round by round, so a change in the machine's speed falls on all of them:
  default        TensorFlow's default pool (as many threads as cores; what the stages ran with before)
  fixed          INTRA_OP_THREADS threads (now)
  fixed, 1 core  INTRA_OP_THREADS threads pinned to one core (taskset): a one-core machine
  1 thread       a pool of one thread (what a 1-CPU Ray actor ran with before)
Per configuration: images/s through the view cache's frozen part (VGG16 up to block3_pool: the cache
at the cut block4_pool) and the full base (extract), training images/s of fine-tuning's step (block 4
and the head on cached activations), the fastest round of each; then whether each configuration's
numbers equal the fixed pool's, bit for bit. Prints a table; ratios only mean something within one run.

    python bench/threads.py --n 64 --rounds 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_SOURCE  # noqa: E402

CONFIGS = {  # name: (intra-op threads or None for the default, pin to one core)
    "default": (None, False),
    "fixed": ("fixed", False),
    "fixed, 1 core": ("fixed", True),
    "1 thread": (1, False),
}


def images(source: Path, n: int, folder: Path) -> list[str]:
    """n photos of `source` (a folder with train/<class>/), or textured stand-ins where it is absent."""
    found = sorted(str(p) for p in (source / "train").glob("*/*.jpg"))[:n] if source.is_dir() else []
    if len(found) >= n:
        return found
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from imagegen import make_textured_folders

    make_textured_folders(folder, {"a": (n + 1) // 2, "b": n // 2})
    print(f"{source}: not found; textured stand-in images", file=sys.stderr)
    return sorted(str(p) for p in folder.glob("*/*.jpg"))[:n]


def worker(args) -> None:
    """One configuration, one round: timings and digests as JSON on stdout."""
    import time

    import numpy as np
    import tensorflow as tf

    from tlpipe.runtime import threads

    if args.threads == "fixed":
        threads.configure()
    elif args.threads is not None:
        tf.config.threading.set_intra_op_parallelism_threads(int(args.threads))
    tf.config.experimental.enable_op_determinism()

    from tlpipe.config import validate_params
    from tlpipe.features.backbones import preprocess, preprocessing_name
    from tlpipe.features.pretrained import build_base
    from tlpipe.features.inputs import read_resized
    from tlpipe.features.boundary import prefix_model
    from tlpipe.model.saved import set_trainable_from
    from tlpipe.train.compile import compile_classifier
    from tlpipe.train.loop import set_determinism
    from tlpipe.train.models import cached_training_model, new_model

    files = json.loads(Path(args.files).read_text())
    x = preprocess(tf.stack([read_resized(tf.constant(f), args.image_size) for f in files]),
                   preprocessing_name("vgg16", args.weights))
    base = build_base("vgg16", args.weights, args.image_size, "float32")
    out = {"rates": {}, "digests": {}}
    for name, layer in (("view cache (block3_pool)", "block3_pool"), ("extract (block5_pool)", "block5_pool")):
        model = prefix_model(base, layer)
        model(x[:2], training=False)  # trace
        t = time.perf_counter()
        acts = np.concatenate([np.asarray(model(x[i:i + args.batch], training=False))
                               for i in range(0, len(files), args.batch)])
        out["rates"][name] = len(files) / (time.perf_counter() - t)
        out["digests"][name] = hashlib.sha256(acts.astype(np.float16).tobytes()).hexdigest()

    set_determinism(0)
    backbone = validate_params({"backbone": {"weights": args.weights, "image_size": args.image_size,
                                             "layer": "block4_pool", "pooling": "avg"}}).backbone
    full = new_model(backbone, "float32", 256, 0.5, 0, ["a", "b"])
    set_trainable_from(full, "block4_conv1")
    model = compile_classifier(cached_training_model(full, "block3_pool"), 2, 1e-5)
    acts = np.asarray(prefix_model(base, "block3_pool")(x[:20], training=False))
    y = (np.arange(len(acts)) % 2).astype(np.float32)
    model.train_on_batch(acts, y)  # trace
    t = time.perf_counter()
    for _ in range(args.steps):
        model.train_on_batch(acts, y)
    out["rates"]["fine-tuning step"] = len(acts) * args.steps / (time.perf_counter() - t)
    out["digests"]["fine-tuning step"] = hashlib.sha256(
        b"".join(np.asarray(v.numpy()).tobytes() for v in model.trainable_variables)).hexdigest()
    print(json.dumps(out))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=Path(DEFAULT_SOURCE))
    ap.add_argument("--n", type=int, default=64, help="photos (at least 20)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="fine-tuning steps of 20 images per round")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=150)
    ap.add_argument("--weights", default="hed-bsds500")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--files", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    from tlpipe.runtime.threads import INTRA_OP_THREADS

    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp) / "files.json"
        files.write_text(json.dumps(images(args.source, max(20, args.n), Path(tmp) / "img")))
        best, digests = {}, {}
        for r in range(args.rounds):
            for name, (threads, pin) in CONFIGS.items():
                cmd = [sys.executable, __file__, "--worker", "--files", str(files), "--steps", str(args.steps),
                       "--batch", str(args.batch), "--image-size", str(args.image_size), "--weights", args.weights]
                cmd += ["--threads", str(threads)] if threads is not None else []
                cmd = ["taskset", "-c", "0", *cmd] if pin else cmd
                res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                for k, v in res["rates"].items():
                    best[(name, k)] = max(best.get((name, k), 0.0), v)
                digests.setdefault(name, res["digests"])
                print(f"round {r + 1}/{args.rounds}: {name} done", file=sys.stderr)
    work = list(next(iter(digests.values())))
    print(f"\nfixed pool: {INTRA_OP_THREADS} intra-op threads; cores here: {len(os.sched_getaffinity(0))}; "
          f"{args.n} photos at {args.image_size} px; fastest of {args.rounds} rounds\n")
    print("| configuration | " + " | ".join(f"{w}, img/s" for w in work) + " | bits equal to fixed |")
    print("|---|" + "---|" * (len(work) + 1))
    for name in CONFIGS:
        same = [w for w in work if digests[name][w] == digests["fixed"][w]]
        print(f"| {name} | " + " | ".join(f"{best[(name, w)]:.1f}" for w in work)
              + f" | {'all' if len(same) == len(work) else ', '.join(same) or 'none'} |")
    print("\nfixed / default: " + ", ".join(f"{w} {best[('fixed', w)] / best[('default', w)]:.2f}x" for w in work))


if __name__ == "__main__":
    main()
