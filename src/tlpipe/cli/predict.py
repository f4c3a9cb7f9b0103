"""`tlpipe predict`: classify image files and folders with a saved model, write a CSV.

    tlpipe predict [--model models/finetuned.keras] [--out preds.csv] [--batch-size 32]
                   [--tta mirror|none] [--evaluate] PATH...

Everything the model needs (class names, image size, preprocessing) comes from the model file,
not from params.yaml. The CSV goes to stdout unless --out is given; messages and the progress bar
go to stderr. With --evaluate the report goes to stdout when the CSV goes to a file, else to
stderr, so `tlpipe predict ... > preds.csv` still yields a clean CSV.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tlpipe import atomic
from tlpipe.cli import positive_int
from tlpipe.runtime.errors import DataError
from tlpipe.runtime.log import log


def _parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Classify image files and folders (recursively, hidden files skipped) with a saved "
                    "tlpipe model; write path, predicted class, p_<class> probabilities and error as CSV.",
    )
    ap.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders of images")
    ap.add_argument("--model", type=Path, default=None,
                    help="model file (default: models/finetuned.keras, else head_aug.keras, else head.keras)")
    ap.add_argument("--out", type=Path, default=None, help="CSV file to write (default: stdout)")
    ap.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass (default 32)")
    ap.add_argument("--tta", choices=("mirror", "none"), default="mirror",
                    help="mirror (default, as the evaluate stage with augment.horizontal_flip on): average each "
                         "image's probabilities with its mirror image's; none: the image alone (for data whose "
                         "mirror image is another class)")
    ap.add_argument("--evaluate", action="store_true",
                    help="PATH is one folder of class subfolders: also print accuracy and a confusion matrix")
    return ap


def main(argv: list[str] | None = None, prog: str = "tlpipe predict") -> None:
    """Usage errors (a bad --batch-size, --evaluate without one folder) exit 2 on stderr, as argparse's own."""
    from tlpipe.model import predict as pr

    ap = _parser(prog)
    args = ap.parse_args(argv)
    if args.evaluate and (len(args.paths) != 1 or not Path(args.paths[0]).is_dir()):
        ap.error("--evaluate takes exactly one folder whose subfolders are named after the classes "
                 f"(got {' '.join(args.paths)})")
    files = pr.collect_images(args.paths)  # before loading the model: a typo fails in a second
    if not files:
        raise DataError(f"no files found in {' '.join(args.paths)}")
    model_path = args.model
    if model_path is None:
        model_path = pr.default_model()
        log.info(f"using model {model_path}")
    model, info = pr.load_classifier(model_path)
    names = list(info["class_names"])
    truth = pr.true_classes(files, args.paths[0], names) if args.evaluate else None

    preds = pr.predict_files(model, files, int(info["image_size"]), len(names), args.batch_size, tta=args.tta)
    for p in preds:
        if p.error:
            log.warning(f"{p.path}: {p.error}")
    text = pr.to_csv(preds, names)
    if args.out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        atomic.write_text(args.out, text)
        failed = sum(1 for p in preds if p.error)
        log.info(f"wrote {args.out}: {len(preds) - failed} predicted, {failed} unreadable")
    if truth is not None:
        report = pr.format_evaluation(pr.evaluate(preds, truth, names))
        (sys.stdout if args.out is not None else sys.stderr).write(report)


if __name__ == "__main__":
    from tlpipe.cli import run_stage

    run_stage(main)
