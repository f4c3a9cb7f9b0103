"""Augment-preview stage: a PNG grid of the first training image and 8 augmented versions of it.

    python stages/augment_preview.py --first-of data/split/train.csv --out plots/augment_preview.png
    python stages/augment_preview.py IMAGE --out x.png [-n 8]        (any image, outside DVC too)
"""

from tlpipe.cli import run_stage
from tlpipe.cli.augment_preview import main

if __name__ == "__main__":
    run_stage(main)
