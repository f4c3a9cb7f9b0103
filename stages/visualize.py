"""visualize stage: activations, filter patterns, Grad-CAM, curves and confusion matrices in reports/index.html."""

import argparse

from tlpipe.cli import run_stage
from tlpipe import device
from tlpipe.config import load_params
from tlpipe.runtime.log import log

TRAIN_METRICS = ("metrics/train_head.json", "metrics/train_head_aug.json", "metrics/finetune.json")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Show what the network learned: one HTML page (reports/index.html) "
                                             "with its images in reports/viz/.")
    ap.add_argument("--models", default="models", help="folder of <model>.keras")
    ap.add_argument("--split-dir", default="data/split", help="folder of test.csv and classes.json")
    ap.add_argument("--images", default="data/images", help="the image store the manifests point into")
    ap.add_argument("--scores", default="reports/predictions/scores.json",
                    help="the evaluate stage's test scores per model and class (JSON)")
    ap.add_argument("--train-metrics", nargs="*", default=list(TRAIN_METRICS),
                    help="the training stages' metrics files (best epoch, validation accuracy)")
    ap.add_argument("--predictions", default="reports/predictions", help="folder of <model>.csv predictions")
    ap.add_argument("--live", default="dvclive", help="dvclive folder: one sub-folder per training stage")
    ap.add_argument("--plots", default="plots", help="folder holding confusion/<model>.csv")
    ap.add_argument("--out", default="reports", help="writes <out>/index.html and <out>/viz/")
    ap.add_argument("--params", default="params.yaml", help="its values that outputs depend on are shown in the report")
    ap.add_argument("--cut", default="features/cut.json", help="the cut extract stored, with the probe's table")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    device.use(params.compute.device)  # before TensorFlow's first op

    from tlpipe.config import what_params
    from tlpipe.report.build import build_report, params_text

    page = build_report(args.models, args.split_dir, args.images, args.scores, args.train_metrics,
                        args.predictions, args.live, args.plots, args.out, params.visualize,
                        params_text(what_params(params)), cut_path=args.cut)
    log.info(f"wrote {page}")


if __name__ == "__main__":
    run_stage(main)
