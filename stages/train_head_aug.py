"""train_head_aug stage: the book's feature extraction WITH augmentation: base frozen, a new head trained
on augmented images (cached views or online), validated on plain images -> models/head_aug.keras.

    python stages/train_head_aug.py --cache features/views.h5 --model models/head_aug.keras
"""

import argparse

from tlpipe.cli import run_stage
from tlpipe import device
from tlpipe.config import load_params


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train a dense head on a frozen base with data augmentation.")
    ap.add_argument("--cache", default="features/views.h5", help="view cache (augment.mode cached)")
    ap.add_argument("--split-dir", default="data/split", help="split manifests (classes; images in online mode)")
    ap.add_argument("--images", default="data/images", help="the image store the manifests point into")
    ap.add_argument("--model", default="models/head_aug.keras", help="full model to write")
    ap.add_argument("--metrics", default="metrics/train_head_aug.json", help="final metrics to write")
    ap.add_argument("--live", default="dvclive/train_head_aug", help="dvclive folder for the curves")
    ap.add_argument("--cut", default="features/cut.json", help="the layer and pooling extract stored (features.cut)")
    ap.add_argument("--features", default="features/train.h5",
                    help="the training split's stored features (statistics for head.standardize)")
    args = ap.parse_args(argv)
    p = load_params()
    device.use(p.compute.device)  # before TensorFlow's first op

    from tlpipe.features.cut import with_cut
    from tlpipe.train.head_aug import run_head_aug
    from tlpipe.train.settings import TrainSettings

    run_head_aug(cache=args.cache, split_dir=args.split_dir, images_dir=args.images, model_out=args.model,
                 metrics_out=args.metrics, live_dir=args.live, backbone=with_cut(p.backbone, args.cut), compute=p.compute,
                 head=p.head, run=TrainSettings.from_params(p.head_aug, p.train), augment=p.augment,
                 train_features=args.features)


if __name__ == "__main__":
    run_stage(main)
