"""finetune stage: a trained model (models/<finetune.from>.keras), its base unfrozen from
finetune.unfreeze_from on, trained jointly with augmentation -> models/finetuned.keras.

    python stages/finetune.py --model-in models/head_aug.keras --model models/finetuned.keras
"""

import argparse

from tlpipe.cli import run_stage
from tlpipe import device
from tlpipe.config import load_params


def main(argv=None):
    ap = argparse.ArgumentParser(description="Fine-tune the top of the base together with the head.")
    ap.add_argument("--cache", default="features/views.h5", help="view cache (augment.mode cached)")
    ap.add_argument("--split-dir", default="data/split", help="split manifests (classes; images in online mode)")
    ap.add_argument("--images", default="data/images", help="the image store the manifests point into")
    ap.add_argument("--model-in", default=None,
                    help="model to start from (default: models/<finetune.from>.keras)")
    ap.add_argument("--start-metrics", default=None,
                    help="the start model's training metrics, for finetune.lr: auto "
                         "(default: metrics/train_<finetune.from>.json)")
    ap.add_argument("--model", default="models/finetuned.keras", help="full model to write")
    ap.add_argument("--metrics", default="metrics/finetune.json", help="final metrics to write")
    ap.add_argument("--live", default="dvclive/finetune", help="dvclive folder for the curves")
    ap.add_argument("--cut", default="features/cut.json", help="the layer and pooling extract stored (features.cut)")
    args = ap.parse_args(argv)
    p = load_params()
    device.use(p.compute.device)  # before TensorFlow's first op

    from tlpipe.features.cut import with_cut
    from tlpipe.train.finetune import run_finetune
    from tlpipe.train.settings import TrainSettings

    run_finetune(cache=args.cache, split_dir=args.split_dir, images_dir=args.images,
                 model_in=args.model_in or f"models/{p.finetune.from_}.keras", model_out=args.model,
                 start_metrics=args.start_metrics or f"metrics/train_{p.finetune.from_}.json",
                 metrics_out=args.metrics, live_dir=args.live, backbone=with_cut(p.backbone, args.cut), compute=p.compute,
                 augment=p.augment, finetune=p.finetune, run=TrainSettings.from_params(p.finetune, p.train))


if __name__ == "__main__":
    run_stage(main)
