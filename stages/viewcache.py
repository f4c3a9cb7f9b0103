"""Viewcache stage: the frozen part of the base over `augment.views` augmented copies of each training
image and the plain validation/test images -> features/views.h5 (see tlpipe.features.viewcache).

    python stages/viewcache.py --split-dir data/split --images data/images --out features/views.h5
"""

import argparse

from tlpipe.cli import run_stage
from tlpipe import device
from tlpipe.config import load_params


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build the augmented-activation cache (resumable if interrupted); "
                                             "in augment.mode online, a small marker file.")
    ap.add_argument("--split-dir", default="data/split", help="folder of {train,validation,test}.csv and classes.json")
    ap.add_argument("--images", default="data/images", help="the image store the manifests point into")
    ap.add_argument("--out", default="features/views.h5", help="cache file to write")
    ap.add_argument("--cut", default="features/cut.json", help="the layer and pooling extract stored (features.cut)")
    args = ap.parse_args(argv)
    p = load_params()
    device.use(p.compute.device)  # before TensorFlow's first op

    from tlpipe.features.cut import with_cut
    from tlpipe.features.engine import Engine
    from tlpipe.features.viewcache import build_from_manifests

    build_from_manifests(args.split_dir, args.images, args.out, backbone=with_cut(p.backbone, args.cut),
                         augment=p.augment, compute=p.compute, unfreeze_from=p.finetune.unfreeze_from,
                         engine=Engine.from_params(p.compute))


if __name__ == "__main__":
    run_stage(main)
