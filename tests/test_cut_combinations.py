"""Every backbone.layer x finetune.unfreeze_from for VGG16: params validation accepts exactly the pairs
whose unfreeze layer lies in the kept base (after its first layer), and for every accepted pair the
fine-tuning model is what the stages build from it: the view cache's boundary is the layer before
unfreeze_from, the cached training model trains exactly unfreeze_from..cut plus the head, and on the
cache's activations it predicts what the full model predicts on the images. (The whole pipeline runs
under representative pairs in test_finetune_cut.py; this covers all of them without DVC.)"""

from __future__ import annotations

import numpy as np
import pytest

from tlpipe.config.choices import AUTO, known_layers, probe_layers
from tlpipe.config import validate_params
from tlpipe.runtime.errors import ConfigError

SIZE = 32
LAYERS = known_layers("vgg16")
PAIRS = [(layer, unfreeze) for layer in (None, AUTO, *LAYERS) for unfreeze in (AUTO, *LAYERS)]


def accepted(layer, unfreeze) -> bool:
    try:
        validate_params({"backbone": {"layer": layer, "weights": "none", "image_size": SIZE},
                         "finetune": {"unfreeze_from": unfreeze}})
    except ConfigError:
        return False
    return True


def cuts(layer) -> tuple[str, ...]:
    """The cuts a backbone.layer may end at: auto's candidates, or the one named (null: the last)."""
    return probe_layers("vgg16") if layer == AUTO else (LAYERS[-1] if layer is None else layer,)


def trains_from(cut: str, unfreeze: str) -> str:
    """The rule, restated: auto is the first conv of the cut's block."""
    return cut.split("_")[0] + "_conv1" if unfreeze == AUTO else unfreeze


def test_validation_accepts_exactly_the_pairs_inside_the_kept_base():
    for layer, unfreeze in PAIRS:
        inside = all(0 < LAYERS.index(trains_from(c, unfreeze)) <= LAYERS.index(c) for c in cuts(layer))
        assert accepted(layer, unfreeze) == inside, (layer, unfreeze)
    # Sanity of the enumeration: many pairs of each kind.
    assert sum(accepted(*p) for p in PAIRS) > 150 and sum(not accepted(*p) for p in PAIRS) > 150


@pytest.fixture(scope="module")
def base():
    from tlpipe.features.pretrained import build_base

    return build_base("vgg16", "none", SIZE)


def test_every_accepted_pair_builds_the_fine_tuning_model_the_cache_trains(base):
    from tlpipe.features import boundary as bounds
    from tlpipe.model.saved import set_trainable_from
    from tlpipe.train.models import cached_training_model, new_model

    images = np.random.RandomState(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    by_cut: dict[str, list[str]] = {}
    for layer, unfreeze in PAIRS:
        if accepted(layer, unfreeze):
            for cut in cuts(layer):
                by_cut.setdefault(cut, []).append(unfreeze)
    checked = 0
    for cut, unfreezes in by_cut.items():
        p = validate_params({"backbone": {"layer": cut, "pooling": "avg", "weights": "none", "image_size": SIZE},
                             "augment": {"mode": "online"}})  # only the backbone section is used
        model = new_model(p.backbone, "float32", 4, 0.0, 0, ("a", "b"), base=base)
        kept = model.get_layer("base")
        want = model(images).numpy()
        for unfreeze in sorted(set(unfreezes)):
            resolved = bounds.resolve_unfreeze("vgg16", base, cut, unfreeze)
            assert resolved == trains_from(cut, unfreeze)
            boundary = bounds.boundary_layer(kept, resolved)
            assert LAYERS.index(boundary) == LAYERS.index(resolved) - 1
            set_trainable_from(model, resolved)
            cached = cached_training_model(model, boundary)
            suffix = [lyr.name for lyr in cached.get_layer("suffix").layers[1:]]
            assert suffix == list(LAYERS[LAYERS.index(resolved): LAYERS.index(cut) + 1]), (cut, unfreeze)
            trained = {w.path.split("/")[0] for w in cached.trainable_weights}
            convs = {name for name in suffix if "_conv" in name}
            assert convs <= trained and not trained & (set(LAYERS) - convs), (cut, unfreeze, trained)
            activations = bounds.prefix_model(kept, boundary)(model.get_layer("preprocess")(images))
            np.testing.assert_allclose(cached(activations).numpy(), want, rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked > 150
