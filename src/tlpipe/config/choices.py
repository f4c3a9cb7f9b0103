"""The closed sets of values a parameter can take, in one place: config validates params.yaml against
them and the modules that implement each choice import them from here. A leaf module (no tlpipe imports), so
a stage that only validates its params does not depend on the code behind every choice. Also the
layer names of the architectures known by name (VGG), and the rules shared by config and the code
that applies them: data.split's shape (check_split), finetune.unfreeze_from against backbone.layer
(unfreeze_layer), so params are checked without building a model."""

import math

BACKBONES = ("vgg16", "vgg19", "resnet50", "inception_v3", "xception", "mobilenet", "mobilenet_v2",
             "efficientnet_b0")  # features.backbones.ARCHS implements each (a test checks they match)
POOLINGS = ("flatten", "avg", "max")  # how a layer's output becomes one vector per image
AUTO = "auto"  # backbone.layer, backbone.pooling, finetune.unfreeze_from: chosen by the pipeline
POOLING_CHOICES = POOLINGS + (AUTO,)  # backbone.pooling: auto lets the extract stage's probe choose
PRECISIONS = ("float32", "bfloat16", "mixed_float16")  # compute.precision (mixed_float16: GPUs only)
DEVICES = ("cpu", "gpu")  # compute.device: which processor computes (their kernels' bits differ)
ENGINES = ("local", "ray")  # compute.engine: where extract and viewcache run (outputs identical)
STRATEGIES = ("auto", "default", "mirrored")  # compute.strategy: tf.distribute strategy for training
FILL_MODES = ("nearest", "reflect", "wrap", "constant")  # augment.fill_mode
AUGMENT_MODES = ("cached", "online")  # augment.mode: views stored by the viewcache stage, or drawn in training
SPLITS = ("train", "validation", "test")  # data.split's keys; data/split/<split>.csv
MODEL_NAMES = ("head", "head_aug", "finetuned")  # models/<name>.keras, in the order the stages write them
FINETUNE_FROM = ("head_aug", "head")  # finetune.from: the model fine-tuning starts from
SCHEDULES = ("constant", "cosine")  # head_aug.schedule, finetune.schedule: the learning rate over the epochs
TRAIN_KEEPS = ("best", "last")  # train.keep: the weights a training stage saves (best validation epoch, or last)
TTA_CHOICES = ("auto", "mirror", "none")  # evaluate.tta: test outputs averaged with the mirror image's (model/tta.py)

def check_split(split: dict) -> tuple[str, dict]:
    """The one rule for data.split: ("counts", {split: positive int}) per class, or ("fractions",
    {split: float strictly between 0 and 1}) adding up to 1. ValueError says what is wrong."""
    if set(split) != set(SPLITS):
        raise ValueError(f"needs exactly the keys {', '.join(SPLITS)} (got {', '.join(sorted(split)) or 'none'})")
    values = list(split.values())
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in values):
        raise ValueError(f"values must be numbers (got {split})")
    if all(isinstance(x, int) for x in values):
        if any(x <= 0 for x in values):
            raise ValueError(f"counts per class must be positive integers (got {split})")
        return "counts", dict(split)
    fractions = [float(x) for x in values]
    if not all(0 < x < 1 for x in fractions):
        raise ValueError(f"fractions must each lie strictly between 0 and 1 (got {split})")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must add up to 1 (they add up to {sum(fractions):g})")
    return "fractions", {k: float(x) for k, x in split.items()}


# finetune.unfreeze_from: "auto" (the last conv block kept in the base), or a layer name.
UNFREEZE_AUTO = AUTO
# The architectures whose layers are known by name without building them: VGG's blockN_convM and
# blockN_pool, convolutions per block. config checks finetune.unfreeze_from against these lists
# before any stage runs; other architectures' names are checked when their base is built.
VGG_CONVS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}


def known_layers(backbone: str) -> tuple[str, ...] | None:
    """The base's layers in order (input layer left out), or None where not known by name."""
    convs = VGG_CONVS.get(backbone)
    if convs is None:
        return None
    return tuple(name for block, n in enumerate(convs, 1)
                 for name in (*(f"block{block}_conv{i}" for i in range(1, n + 1)), f"block{block}_pool"))


def probe_layers(backbone: str) -> tuple[str, ...] | None:
    """backbone.layer: auto's candidate cuts, shallow to deep: the last pooling layers of VGG's top three
    blocks. None where the layers are not known by name (auto then keeps the base's last layer)."""
    names = known_layers(backbone)
    if names is None:
        return None
    return tuple(n for n in names if n.endswith("_pool"))[-3:]


def unfreeze_layer(backbone: str, layer: str | None, unfreeze_from: str, names=None) -> str | None:
    """finetune.unfreeze_from resolved against the kept base: the base's layers `names` (input layer
    left out; default known_layers(backbone)) cut at `layer` (backbone.layer; None: the last one).

    `auto` is the first layer of the block the cut lies in (VGG: block4_pool -> block4_conv1). An
    explicit name must lie in the kept base. ValueError says what is wrong, naming both keys; None
    when the layers are not known here (checked again once the base is built) or `layer` is not one of
    them (backbone.layer's own check reports that)."""
    names = list(known_layers(backbone) or ()) if names is None else list(names)
    if not names:
        if unfreeze_from == UNFREEZE_AUTO:
            raise ValueError(f"finetune.unfreeze_from: auto is defined for {' and '.join(VGG_CONVS)} "
                             f"(blocks named blockN_*), not {backbone}; name the first layer to train")
        return None
    cut = names[-1] if layer is None else layer
    if cut not in names:
        return None
    kept = names[: names.index(cut) + 1]
    if unfreeze_from == UNFREEZE_AUTO:
        if backbone not in VGG_CONVS:
            raise ValueError(f"finetune.unfreeze_from: auto is defined for {' and '.join(VGG_CONVS)} "
                             f"(blocks named blockN_*), not {backbone}; name the first layer to train")
        return cut.split("_")[0] + "_conv1"
    if unfreeze_from in kept:
        return unfreeze_from
    cut_text = f"backbone.layer: {layer}" if layer is not None else f"backbone.layer: null (= {cut})"
    if unfreeze_from in names:
        raise ValueError(f"finetune.unfreeze_from: {unfreeze_from!r} lies after the cut ({cut_text}), so the "
                         f"model has no such layer; choose auto (the last block kept) or a layer up to {cut}, "
                         f"or set backbone.layer to {unfreeze_from!r} or later")
    raise ValueError(f"finetune.unfreeze_from: {backbone} has no layer {unfreeze_from!r}; choose one of: "
                     f"{', '.join(kept)} (up to {cut_text}), or auto")
