"""evaluate stage: every model in params.evaluate.models on the test split (metrics, plots, predictions)."""

import argparse

from tlpipe.cli import run_stage
from tlpipe import device
from tlpipe.config import load_params


def main(argv=None):
    ap = argparse.ArgumentParser(description="Evaluate the saved models on the test split: the DVC metrics "
                                             "(accuracy, ROC AUC, loss per model), confusion/ROC plot data, "
                                             "per-image predictions and every score.")
    ap.add_argument("--features", default="features", help="folder of test.h5 (shortcut for frozen-base models)")
    ap.add_argument("--models", default="models", help="folder of <model>.keras")
    ap.add_argument("--split-dir", default="data/split", help="folder of test.csv and classes.json")
    ap.add_argument("--images", default="data/images", help="the image store the manifests point into")
    ap.add_argument("--metrics", default="metrics/evaluate.json",
                    help="DVC metrics: accuracy, roc_auc, loss per model (JSON)")
    ap.add_argument("--plots", default="plots", help="writes plots/confusion/<model>.csv and plots/roc/<model>.csv")
    ap.add_argument("--predictions", default="reports/predictions", help="folder of <model>.csv predictions and "
                    "scores.json (every score per model and class)")
    args = ap.parse_args(argv)
    params = load_params()
    device.use(params.compute.device)  # before TensorFlow's first op

    from tlpipe.evaluate.run import run_evaluate

    from tlpipe.model import tta

    run_evaluate(args.features, args.models, args.split_dir, args.images, args.metrics, args.plots,
                 args.predictions, params.evaluate.models,
                 tta.resolve(params.evaluate.tta, params.augment.horizontal_flip))


if __name__ == "__main__":
    run_stage(main)
