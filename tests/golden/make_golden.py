"""Writes tests/golden/tiny.keras and tiny_expected.npz with the code of commit 4c5155b (run once,
before the package was restructured). The model has tlpipe's saved format (Preprocess with metadata,
a nested base, pool, the three head layers) on a two-layer stand-in base, so it is a few KB.

    python tests/golden/make_golden.py
"""

from pathlib import Path

import keras
import numpy as np

from tlpipe.model.dense_head import build_head
from tlpipe.model.saved import assemble, save_model

HERE = Path(__file__).parent


def tiny_base() -> keras.Model:
    x = inputs = keras.Input(shape=(32, 32, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="block1_conv1",
                            kernel_initializer=keras.initializers.GlorotUniform(seed=1))(x)
    x = keras.layers.MaxPooling2D(2, name="block1_pool")(x)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="block2_conv1",
                            kernel_initializer=keras.initializers.GlorotUniform(seed=2))(x)
    x = keras.layers.MaxPooling2D(2, name="block2_pool")(x)
    return keras.Model(inputs, x, name="vgg16")


def main():
    keras.utils.set_random_seed(0)
    base = tiny_base()
    head = build_head(6, 2, units=8, dropout=0.5, seed=3)
    info = {"class_names": ["cat", "dog"], "image_size": 32, "backbone": "vgg16", "weights": "none",
            "weights_sha256": None, "preprocessing": "tf", "trainable_from": "block2_conv1"}
    model = assemble(base, "block2_pool", "avg", head, info, name="finetuned")
    save_model(model, HERE / "tiny.keras")
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    np.savez(HERE / "tiny_expected.npz", images=images, probabilities=model.predict(images, verbose=0))


if __name__ == "__main__":
    main()
