"""Benchmark: the Ray engine against the local one, and 1 against 2 Ray actors, on real photos.

One run, the same images for every configuration, each writing its own copy of the features:
  local          the local engine (this process, TensorFlow's default threads)
  ray 1 actor    one actor holding every CPU
  ray 1 x 1      one actor holding one CPU
  ray 2 x 1      two actors holding one CPU each
(Every actor runs TensorFlow with the fixed intra-op pool of tlpipe.runtime.threads, whatever CPUs it holds;
before that pool was fixed, an actor ran one intra-op thread per CPU it held, which is what the
figures in docs/scale.md measured.)
Then the decode cost alone (`--decode-only`: just that). Prints images/s per configuration (end to end, and steady: from the first finished shard to the
last, so a worker's start-up, which a long run pays once, is left out), the ratios the issue asks
for (ray 1 actor / local, target >= 0.9; ray 2 x 1 / ray 1 x 1, the scaling), where a worker's time
goes (waiting for decoded images, the forward pass, writing the shard), and whether every
configuration wrote the same bytes. Ray runs locally here (`ray.init(num_cpus=...)`), started once.

    python bench/scale.py --n 320 --weights hed-bsds500 --image-size 150 --batch-size 16 --rows-per-shard 32
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_SOURCE, extract_split, make_split  # noqa: E402


def tree_hash(table: Path) -> str:
    """One hash of the table file and its shard folder (names and bytes)."""
    h = hashlib.sha256()
    folder = table.with_name(table.stem + ".shards")
    for p in [table, *sorted(folder.iterdir())]:
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def decode_cost(files: list[Path], size: int) -> str:
    """JPEG decode and resize alone, one thread: the per-image CPU cost the projection uses."""
    import tensorflow as tf

    from tlpipe.features.inputs import read_resized

    for f in files[:8]:  # warm-up
        read_resized(tf.constant(str(f)), size)
    cpu, wall = time.process_time(), time.perf_counter()
    for f in files:
        read_resized(tf.constant(str(f)), size).numpy()
    kib = sum(f.stat().st_size for f in files) / len(files) / 1024
    return (f"decode alone: {len(files)} JPEGs of {kib:.1f} KiB on average, decoded and resized to {size} px: "
            f"{(time.process_time() - cpu) / len(files) * 1e3:.1f} ms CPU/image, "
            f"{(time.perf_counter() - wall) / len(files) * 1e3:.1f} ms wall/image")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=Path(DEFAULT_SOURCE), help="cats_and_dogs_filtered-style folder")
    ap.add_argument("--n", type=int, default=320, help="images (half cats, half dogs, from train/)")
    ap.add_argument("--weights", default="hed-bsds500")
    ap.add_argument("--image-size", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rows-per-shard", type=int, default=32)
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs given to the local Ray")
    ap.add_argument("--decode-only", action="store_true", help="only the decode cost (one thread)")
    args = ap.parse_args(argv)
    if args.decode_only:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tmp = Path(tempfile.mkdtemp(prefix="tlpipe-scale-"))
        split = make_split(args.source, tmp, args.n // 2, 0, 0)
        import pandas as pd

        print(decode_cost([args.source / f for f in pd.read_csv(split / "train.csv")["file"]], args.image_size))
        return

    import logging

    import ray

    from tlpipe.features.engine import Engine
    from tlpipe.features.extract import BaseSpec, Extractor

    class Recording(Engine):
        """An engine that keeps each shard's result (timings) and when it arrived."""

        def run(self, jobs, make_worker, progress=None):
            self.arrivals.clear()
            def arrived(r):
                self.arrivals.append(time.perf_counter())
                if progress is not None:
                    progress(r)

            results = super().run(jobs, make_worker, arrived)
            self.results.update(results)
            return results

    def recording(*a, **kw):
        e = Recording(*a, **kw)
        object.__setattr__(e, "arrivals", [])
        object.__setattr__(e, "results", {})
        return e

    tmp = Path(tempfile.mkdtemp(prefix="tlpipe-scale-"))
    split = make_split(args.source, tmp, args.n // 2, 0, 0)
    classes = ["cats", "dogs"]
    spec = BaseSpec("vgg16", args.weights, None, "flatten", args.image_size)
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    configs = [("local", recording("local")),
               ("ray 1 actor", recording("ray", actors=1)),
               ("ray 1 x 1", recording("ray", actors=1, cpus_per_actor=1)),
               ("ray 2 x 1", recording("ray", actors=2, cpus_per_actor=1))]
    rows = {}
    for name, engine in configs:
        out = tmp / name.replace(" ", "_") / "train.h5"
        t0 = time.perf_counter()
        # The extract stage's steps for one split (Ray's actors build their own model from the spec).
        extractor = Extractor(spec)
        extract_split(split / "train.csv", args.source, out, extractor, classes, args.batch_size,
                      chunk_rows=args.rows_per_shard, engine=engine)
        wall = time.perf_counter() - t0
        first, last = engine.arrivals[0], engine.arrivals[-1]
        steady = (args.n - args.rows_per_shard) / (last - first) if last > first else float("nan")
        parts = {k: sum(r.get(k, 0.0) for r in engine.results.values()) for k in ("decode_s", "forward_s", "write_s")}
        rows[name] = {"wall": wall, "e2e": args.n / wall, "steady": steady, "hash": tree_hash(out), **parts}
        print(f"{name:12s} {args.n / wall:6.2f} img/s end to end ({wall:5.1f} s), {steady:6.2f} img/s steady; "
              f"worker time: decode wait {parts['decode_s']:5.1f} s, forward {parts['forward_s']:5.1f} s, "
              f"write {parts['write_s']:4.2f} s; bytes {rows[name]['hash']}", flush=True)
    ray.shutdown()

    r = rows
    print()
    print(f"images {args.n}, {args.image_size} px, vgg16 {args.weights}, batch {args.batch_size}, "
          f"{args.rows_per_shard} rows per shard, {args.cpus} CPUs")
    print(f"ray 1 actor / local throughput: steady {r['ray 1 actor']['steady'] / r['local']['steady']:.2f}, "
          f"end to end {r['ray 1 actor']['e2e'] / r['local']['e2e']:.2f} (target >= 0.9)")
    print(f"ray 2 x 1 / ray 1 x 1 (scaling, one CPU per actor): steady "
          f"{r['ray 2 x 1']['steady'] / r['ray 1 x 1']['steady']:.2f}, end to end "
          f"{r['ray 2 x 1']['e2e'] / r['ray 1 x 1']['e2e']:.2f} (ideal 2.0 on 2 free cores)")
    for name, v in r.items():
        busy = v["decode_s"] + v["forward_s"] + v["write_s"]
        print(f"{name:12s} where a worker's time goes: decode wait {v['decode_s'] / busy:4.0%}, "
              f"forward {v['forward_s'] / busy:4.0%}, write {v['write_s'] / busy:4.0%}")
    print("same bytes for every configuration:", len({v["hash"] for v in r.values()}) == 1)
    import pandas as pd

    print(decode_cost([args.source / f for f in pd.read_csv(split / "train.csv")["file"]], args.image_size))


if __name__ == "__main__":
    main()
