"""Benchmark: is feature extraction limited by the model, not by reading images?

Measures, in one run and on the same sample of real photos:
  disk:   the real extract path (features.extract's compute_split and assemble_split: JPEG files ->
          tf.data decode, resize, preprocess -> feature model -> chunk files -> HDF5), images/s;
  memory: the same feature model's forward pass on the same images already decoded, resized and
          preprocessed, held in memory as tensors, images/s;
and prints the ratio disk/memory (target >= 0.9: the input pipeline hides behind the model).

    python bench/extract.py --n 300 --weights hed-bsds500 --image-size 150 --precision float32
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tlpipe.config.choices import PRECISIONS

sys.path.insert(0, str(Path(__file__).parent))
from common import extract_split  # noqa: E402  (bench/common.py)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_SOURCE = "/work/shared/datasets/cats_and_dogs_filtered"


def sample_files(source: Path, n: int) -> list[Path]:
    """n JPEGs spread evenly over the sorted source (both classes, all splits), deterministically."""
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"no images under {source}; pass --source")
    step = max(1, len(files) // n)
    return files[::step][:n]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=Path(DEFAULT_SOURCE), help="folder of images (searched recursively)")
    ap.add_argument("--n", type=int, default=300, help="images in the sample")
    ap.add_argument("--backbone", default="vgg16")
    ap.add_argument("--weights", default="hed-bsds500")
    ap.add_argument("--layer", default=None)
    ap.add_argument("--pooling", default="flatten")
    ap.add_argument("--image-size", type=int, default=150)
    ap.add_argument("--precision", default="float32", choices=PRECISIONS)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved memory/disk rounds; the best of each counts")
    args = ap.parse_args(argv)

    import pandas as pd
    import tensorflow as tf

    from tlpipe.features.extract import BaseSpec, Extractor
    from tlpipe.features.inputs import image_dataset

    files = sample_files(args.source, args.n)
    n = len(files)
    spec = BaseSpec(args.backbone, args.weights, args.layer, args.pooling, args.image_size)
    extractor = Extractor(spec, args.precision)
    print(f"cpu: {cpu_name()} ({os.cpu_count()} cores); tensorflow {tf.__version__}")
    print(f"{n} images from {args.source}; {args.backbone} {args.weights} {extractor.layer} {args.pooling} "
          f"{args.image_size} px, {args.precision}, batch {args.batch_size}, feature dim {extractor.dim}")

    # Same batches for both measurements, decoded and preprocessed once, outside any timing.
    tf.config.experimental.enable_op_determinism()  # as the extract workers do: time the same kernels
    batches = list(image_dataset([str(f) for f in files], args.image_size, args.batch_size, extractor.preprocessing))
    extractor(batches[0])
    if len(batches[-1]) != len(batches[0]):
        extractor(batches[-1])  # trace the smaller last batch too: both runs below are warm

    def memory_pass() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        for batch in batches:
            extractor(batch)
        return time.perf_counter() - t0, time.process_time() - c0

    def disk_pass(tmp: Path) -> tuple[float, float]:
        out = tmp / "bench.h5"
        out.unlink(missing_ok=True)
        t0, c0 = time.perf_counter(), time.process_time()
        extract_split(manifest, args.source, out, extractor, ["x"], args.batch_size)
        return time.perf_counter() - t0, time.process_time() - c0

    # Interleaved rounds, best of each: on a shared machine, other load only ever slows a pass down.
    memory_s, disk_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "bench.csv"
        rel = [f.relative_to(args.source).as_posix() for f in files]
        pd.DataFrame({"path": rel, "class_name": "x", "label": 0, "sha256": "", "file": rel}).to_csv(manifest, index=False)
        for _ in range(args.rounds):
            memory_s.append(memory_pass())
            disk_s.append(disk_pass(Path(tmp)))
    # (wall s, cpu s) per round. CPU seconds (all threads of this process) show the input
    # pipeline's own cost even when other processes compete for the cores.
    print("rounds, wall s (cpu s): memory " + ", ".join(f"{w:.1f} ({c:.1f})" for w, c in memory_s)
          + "; disk " + ", ".join(f"{w:.1f} ({c:.1f})" for w, c in disk_s))
    (memory_w, memory_c), (disk_w, disk_c) = min(memory_s), min(disk_s)
    memory_ips, disk_ips = n / memory_w, n / disk_w
    print(f"memory (forward pass on in-memory tensors): {memory_ips:7.2f} images/s ({memory_w:.1f} s wall, "
          f"{memory_c / n * 1000:.0f} ms cpu/image)")
    print(f"disk   (real extract path, files -> .h5):   {disk_ips:7.2f} images/s ({disk_w:.1f} s wall, "
          f"{disk_c / n * 1000:.0f} ms cpu/image)")
    print(f"ratio disk/memory: {disk_ips / memory_ips:.3f} images/s (target >= 0.9); "
          f"cpu-time ratio {min(c for _, c in memory_s) / min(c for _, c in disk_s):.3f}")


if __name__ == "__main__":
    main()
