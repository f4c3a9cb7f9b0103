"""The train_head stage: the dense head on the extract stage's stored features, saved as a full model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tlpipe.runtime.errors import FeatureFileError
from tlpipe.runtime.log import log
from tlpipe.model.saved import FEATURE_KEYS
from tlpipe.train import lr_search


def check_attrs_agree(files_attrs: dict) -> dict:
    """{path: attrs} -> the shared FEATURE_KEYS attrs; FeatureFileError naming the key and both files if
    they differ."""
    (first, ref), *rest = files_attrs.items()
    for path, attrs in rest:
        for key in FEATURE_KEYS:
            if attrs.get(key) != ref.get(key):
                raise FeatureFileError(
                    f"{path} has {key}={attrs.get(key)!r} but {first} has {ref.get(key)!r}: they come from "
                    f"different extract runs; rerun the extract stage (`dvc repro extract`)"
                )
    return {k: ref.get(k) for k in FEATURE_KEYS}


def check_backbone(path, attrs: dict, backbone) -> None:
    """FeatureFileError listing every attr of `path` that differs from params.backbone."""
    from tlpipe.features.backbones import default_layer

    want = {"name": ("backbone", backbone.name), "weights": ("weights", backbone.weights),
            "layer": ("layer", backbone.layer or default_layer(backbone.name)),
            "pooling": ("pooling", backbone.pooling), "image_size": ("image_size", int(backbone.image_size))}
    diffs = [(key, attr, attrs.get(attr), value) for key, (attr, value) in want.items() if attrs.get(attr) != value]
    if diffs:
        made = ", ".join(f"{attr}={got!r}" for _, attr, got, _ in diffs)
        asked = ", ".join(f"backbone.{key}={value!r}" for key, _, _, value in diffs)
        raise FeatureFileError(f"{path}: made with {made} but params.yaml has {asked}; "
                               f"rerun the extract stage (`dvc repro extract`)")


def base_for(attrs: dict, precision: str = "float32"):
    """The convolutional base the features came from, rebuilt, its weights file checked unchanged."""
    from tlpipe.features import pretrained

    base = pretrained.build_base(attrs["backbone"], attrs["weights"], int(attrs["image_size"]), precision)
    now = pretrained.weights_sha256(attrs["backbone"], attrs["weights"], int(attrs["image_size"]))
    if (now or None) != (attrs.get("weights_sha256") or None):
        raise FeatureFileError(
            f"backbone weights {attrs['weights']!r} changed since the features were extracted (SHA-256 "
            f"{attrs.get('weights_sha256')} then, {now} now); rerun the extract stage (`dvc repro extract`)"
        )
    return base


def read_stored_features(features_dir, backbone=None):
    """features_dir/{train,validation}.h5 checked against each other and params.backbone (None: not
    checked) -> (StoredFeatures, their shared attrs)."""
    from tlpipe.features.featurefile import read_features
    from tlpipe.train.trainingdata import StoredFeatures

    features_dir = Path(features_dir)
    paths = {part: features_dir / f"{part}.h5" for part in ("train", "validation")}
    data = {part: read_features(p) for part, p in paths.items()}
    if backbone is not None:
        for part, p in paths.items():
            check_backbone(p, data[part][3], backbone)
    attrs = check_attrs_agree({str(paths[part]): data[part][3] for part in paths})
    n_classes = len(attrs["class_names"])
    for part, (x, y, _, _) in data.items():
        if len(y) == 0:
            raise FeatureFileError(f"{paths[part]}: holds no samples; check the data split (data.split)")
        if y.min() < 0 or y.max() >= n_classes:
            raise FeatureFileError(f"{paths[part]}: labels outside 0..{n_classes - 1}; rerun the extract stage")
    (xt, yt, _, _), (xv, yv, _, _) = data["train"], data["validation"]
    if xt.shape[1] != xv.shape[1]:
        raise FeatureFileError(f"{paths['train']} has {xt.shape[1]} features per image, {paths['validation']} "
                               f"{xv.shape[1]}; rerun the extract stage (`dvc repro extract`)")
    return StoredFeatures((xt, yt), (xv, yv)), attrs


def head_maker(data, n_classes: int, head, seed: int, shrink: float | None = None):
    """lr -> a new compiled head for `data` (params.head's units, dropout, standardize), seeded alike.
    `shrink`: the variance shrink of the standardisation (None: dense_head.VARIANCE_SHRINK; benches)."""
    from tlpipe.model.dense_head import VARIANCE_SHRINK, build_head, feature_stats
    from tlpipe.train.compile import compile_classifier

    stats = feature_stats(data.train[0], VARIANCE_SHRINK if shrink is None else shrink) if head.standardize else None

    def make(lr):
        return compile_classifier(build_head(data.train[0].shape[1], n_classes, head.units, head.dropout,
                                             seed=seed, stats=stats), n_classes, lr)

    return make


def run_train_head(features_dir, model_out, metrics_out, live_dir, head, run=None, backbone=None,
                   on_epoch_end=None, strategy: str = "auto") -> dict:
    """train_head: the dense head on stored features, saved as a full model (model.saved format).

    `head`: params.head (units, dropout, standardize; lr, epochs, batch_size, seed); `run`: the
    settings.TrainSettings of head and params.train (None: head's with train's defaults);
    `backbone`: params.backbone, which the feature files must match (None: not checked); `strategy`:
    compute.strategy (train.strategy). Writes `model_out` and the metrics file (loop.metrics_of);
    returns fit's summary with the per-epoch history. With head.lr auto the model and history are the
    chosen rate's sweep run (lr_search), which has no checkpoint and calls no `on_epoch_end`.
    """
    from tlpipe.model.saved import assemble, save_model
    from tlpipe.atomic import write_json
    from tlpipe.train.callbacks import write_live
    from tlpipe.train.checkpoint import checkpoint_dir_for
    from tlpipe.train.loop import fit, metrics_of
    from tlpipe.train.settings import TrainSettings
    from tlpipe.train.strategy import training_strategy

    run = run or TrainSettings.from_params(head)
    # The model's settings too: a checkpoint resumes only into the same head.
    run = replace(run, fingerprint={**run.fingerprint, "units": int(head.units), "dropout": float(head.dropout),
                                    "standardize": bool(head.standardize)})
    data, attrs = read_stored_features(features_dir, backbone)
    make = head_maker(data, len(attrs["class_names"]), head, run.seed)
    with training_strategy(strategy, run.batch_size).scope():
        search = None
        if run.lr is None:  # head.lr: auto (no checkpoint: a killed run sweeps again, a few minutes)
            log.info(f"head.lr auto: training the head at {len(lr_search.CANDIDATES)} rates on the stored features")
            search, (lr, model, result) = lr_search.sweep(make, data, run)
            run = replace(run, lr=lr)
            write_live(live_dir, result["history"])
            log.info(f"head.lr auto: {lr:g} (lowest validation loss), its run kept")
        else:
            model = make(run.lr)
            result = fit(model, data, run, live_dir=live_dir, checkpoint_dir=checkpoint_dir_for(model_out),
                         on_epoch_end=on_epoch_end)

    info = {**attrs, "trainable_from": None}
    save_model(assemble(base_for(attrs), attrs["layer"], attrs["pooling"], model, info, name="head"), model_out)
    metrics = metrics_of(result, model_out, run, search)
    write_json(metrics_out, metrics)
    result["lr"] = float(run.lr)
    return result
