"""`tlpipe augment-preview IMAGE [--out x.png] [-n 8]`, and the augment_preview stage (`--first-of`):
a PNG grid of an image and augmented versions of it, from the augment section of params.yaml."""

from __future__ import annotations

import argparse
from pathlib import Path

from tlpipe.cli import positive_int


def _parser(prog: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Write a PNG grid of an image and augmented versions "
                                 "of it, using the augment section of params.yaml.")
    ap.add_argument("image", nargs="?", help="image file (or use --first-of)")
    ap.add_argument("--first-of", metavar="CSV", help="use the first image of this split manifest instead")
    ap.add_argument("--images", default="data/images", help="image store of the --first-of manifest")
    ap.add_argument("--out", default="augment_preview.png", help="PNG to write (default augment_preview.png)")
    ap.add_argument("-n", type=positive_int, default=8, help="augmented versions to show (default 8)")
    ap.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    return ap


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    from tlpipe import device
    from tlpipe.config import load_params
    from tlpipe.data.manifests import first_image
    from tlpipe.runtime.errors import DataError
    from tlpipe.features.augment_preview import preview
    from tlpipe.runtime.log import log

    ap = _parser(prog)
    args = ap.parse_args(argv)
    if (args.image is None) == (args.first_of is None):
        ap.error("give an IMAGE or --first-of CSV (one of them)")
    if args.image is not None and not Path(args.image).is_file():
        raise DataError(f"{args.image}: no such image file")
    p = load_params(args.params)
    device.use(p.compute.device)  # before TensorFlow's first op
    image = args.image or first_image(args.first_of, args.images)
    out = preview(image, args.out, p.augment, n=args.n, image_size=p.backbone.image_size)
    log.info(f"augment preview of {image} -> {out}")
    return out
