"""One validated view of params.yaml: the schema, and `load_params()`, the one entry point.

Every stage reads its section through `load_params()`. Unknown keys, wrong types and out-of-range
values stop the stage with a message that names the key (`head.lr8`) and what was expected, so a
typo in `dvc exp run -S ...` never silently falls back to a default. Around it, each in its own module:
the closed sets and shared rules (choices), the error lines (messages), the YAML reading
(yamlfloat) and the test-only read recording (paramrecord); the CPU's bfloat16 support is
tlpipe.runtime.cpu's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tlpipe.config.choices import (AUGMENT_MODES, AUTO, BACKBONES, ENGINES, FILL_MODES, FINETUNE_FROM, MODEL_NAMES,
                            POOLING_CHOICES, PRECISIONS, DEVICES, SCHEDULES, STRATEGIES, TRAIN_KEEPS, TTA_CHOICES,
                            UNFREEZE_AUTO, check_split, known_layers, probe_layers, unfreeze_layer)
from tlpipe.config.messages import error_lines
from tlpipe.runtime.cpu import BF16_CPU_FLAGS, native_bfloat16
from tlpipe.runtime.errors import ConfigError
from tlpipe.config.paramrecord import RECORD_ENV, Recorded, Recorder, leaf_keys, model_of
from tlpipe.config.yamlfloat import load_yaml

PARAMS_FILE = "params.yaml"

PosInt = Annotated[int, Field(strict=True, gt=0)]
NonNegInt = Annotated[int, Field(strict=True, ge=0)]
LearningRate = Annotated[float, Field(gt=0, le=1)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Section(BaseModel):
    # strict: "30" is not 30; forbid: "lr8" is not silently ignored.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


class DataParams(Section):
    source: str = "https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip"
    sha256: str | None = None
    split: dict[str, int | float] = Field(
        default_factory=lambda: {"train": 0.5, "validation": 0.25, "test": 0.25}
    )
    seed: NonNegInt = 42
    min_per_split: PosInt = 1

    @field_validator("source")
    @classmethod
    def _source_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a local folder or an http(s) URL of a .zip/.tar archive")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha256_hex(cls, v: str | None) -> str | None:
        if v is not None:
            v = v.lower()
            if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
                raise ValueError("must be 64 hexadecimal digits (or null)")
        return v

    @field_validator("split")
    @classmethod
    def _split_shape(cls, v: dict) -> dict:
        return check_split(v)[1]


class BackboneParams(Section):
    name: Literal[BACKBONES] = "vgg16"  # type: ignore[valid-type]
    weights: str = "imagenet"
    # auto: the extract stage's linear probe chooses (features/probe.py); null: the base's last layer.
    layer: str | None = AUTO
    pooling: Literal[POOLING_CHOICES] = AUTO  # type: ignore[valid-type]
    image_size: Annotated[int, Field(strict=True, ge=32, le=1024)] = 150

    @field_validator("weights")
    @classmethod
    def _weights_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be imagenet, hed-bsds500, none, or a path to a weights file")
        return v


class ComputeParams(Section):
    precision: Literal[PRECISIONS] = "float32"  # type: ignore[valid-type]
    device: Literal[DEVICES] = "cpu"  # type: ignore[valid-type]
    batch_size: PosInt = 32
    # How, not what (HOW_KEYS): outputs do not depend on these, so no stage declares them in dvc.yaml.
    engine: Literal[ENGINES] = "local"  # type: ignore[valid-type]
    ray_address: str | None = None
    strategy: Literal[STRATEGIES] = "auto"  # type: ignore[valid-type]

    @field_validator("precision", mode="before")
    @classmethod
    def _no_auto_precision(cls, v):
        # DVC records the value as written: an `auto` that meant bfloat16 on one CPU and float32 on
        # another would let the run cache and `dvc pull` hand one machine's outputs to the other.
        if v == AUTO:
            here = ("this CPU lists " + " or ".join(BF16_CPU_FLAGS) if native_bfloat16()
                    else "this CPU lists neither, so float32 is the fast one here")
            raise ValueError(f"auto is not accepted: DVC records the value as written, so machines resolving it "
                             f"to bfloat16 and to float32 would share each other's outputs as if they were the "
                             f"same; write the precision: bfloat16 (fast only where the CPU lists "
                             f"{' or '.join(BF16_CPU_FLAGS)}; {here}) or float32")
        return v

    @model_validator(mode="after")
    def _float16_on_a_gpu(self):
        if self.precision == "mixed_float16" and self.device != "gpu":
            raise ValueError("compute.precision: mixed_float16 computes on a GPU; set compute.device: gpu "
                             "(or use float32, or bfloat16 on a CPU with AVX-512 BF16)")
        return self


# Keys that change how a stage computes, never what it writes (byte-identical outputs, or training
# metrics within a stated tolerance): dvc.yaml leaves them out, so switching them reruns nothing.
# train.resume: a resumed run is bit-for-bit an uninterrupted one (train/checkpoint.py).
HOW_KEYS = ("compute.engine", "compute.ray_address", "compute.strategy", "train.resume")


class HeadParams(Section):
    units: PosInt = 256
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.5
    standardize: bool = True  # a Normalization layer with the training features' statistics first
    # auto: the rate whose run scores the lowest validation loss among lr_search.CANDIDATES (train/lr_search.py)
    lr: LearningRate | Literal[AUTO] = AUTO  # type: ignore[valid-type]
    epochs: PosInt = 30
    batch_size: PosInt = 20
    seed: NonNegInt = 42


class AugmentParams(Section):
    rotation_range: Annotated[float, Field(ge=0, le=180)] = 40.0
    width_shift_range: Fraction = 0.2
    height_shift_range: Fraction = 0.2
    shear_range: Annotated[float, Field(ge=0, le=1)] = 0.2
    zoom_range: Annotated[float, Field(ge=0, lt=1)] = 0.2
    horizontal_flip: bool = True
    fill_mode: Literal[FILL_MODES] = "nearest"  # type: ignore[valid-type]
    mode: Literal[AUGMENT_MODES] = "cached"  # type: ignore[valid-type]
    views: PosInt = 3
    seed: NonNegInt = 42


class TrainRunParams(Section):
    # auto (head_aug): the rate of lowest validation loss among lr_search.CANDIDATES, trained on the cached
    # views' pooled features (train/head_aug.py); auto (finetune): a fixed fraction of the rate the start
    # model trained at (train/finetune.py)
    lr: LearningRate | Literal[AUTO] = AUTO  # type: ignore[valid-type]
    schedule: Literal[SCHEDULES] = "constant"  # type: ignore[valid-type]
    # auto: as many epochs as make a budget of optimizer steps (head_aug.STEPS, finetune.STEPS)
    epochs: PosInt | Literal[AUTO] = AUTO  # type: ignore[valid-type]
    batch_size: PosInt = 20
    seed: NonNegInt = 42


class FinetuneParams(TrainRunParams):
    from_: Literal[FINETUNE_FROM] = Field("head_aug", alias="from")  # type: ignore[valid-type]
    # auto: the last conv block kept in the base (choices.unfreeze_layer), or a layer name up to backbone.layer.
    unfreeze_from: str = UNFREEZE_AUTO


class TrainParams(Section):
    resume: bool = False  # how, not what (HOW_KEYS)
    keep: Literal[TRAIN_KEEPS] = "best"  # type: ignore[valid-type]
    patience: PosInt | None = None


class EvaluateParams(Section):
    models: list[Literal[MODEL_NAMES]] = Field(default_factory=lambda: list(MODEL_NAMES))  # type: ignore[valid-type]
    # auto: mirror where augment.horizontal_flip is on (model/tta.py)
    tta: Literal[TTA_CHOICES] = AUTO  # type: ignore[valid-type]

    @field_validator("models")
    @classmethod
    def _models_unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("list at least one model")
        if len(set(v)) != len(v):
            raise ValueError(f"lists a model twice: {v}")
        return v


class VisualizeParams(Section):
    model: Literal[MODEL_NAMES] = "finetuned"  # type: ignore[valid-type]
    images: PosInt | list[str] = 4
    layers: PosInt = 8
    # auto: the first convolution of each block the model keeps, up to four (report.filters.auto_layers),
    # so the default holds for every cut backbone.layer: auto can choose.
    filter_layers: Literal[AUTO] | list[str] = AUTO  # type: ignore[valid-type]
    filters: PosInt = 16
    filter_steps: PosInt = 30
    gradcam_layer: str | None = None
    gradcam_per_class: PosInt = 2


class Params(Section):
    data: DataParams = Field(default_factory=DataParams)
    backbone: BackboneParams = Field(default_factory=BackboneParams)
    compute: ComputeParams = Field(default_factory=ComputeParams)
    head: HeadParams = Field(default_factory=HeadParams)
    augment: AugmentParams = Field(default_factory=AugmentParams)
    head_aug: TrainRunParams = Field(default_factory=TrainRunParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    visualize: VisualizeParams = Field(default_factory=VisualizeParams)

    @model_validator(mode="after")
    def _hed_needs_vgg16(self) -> "Params":
        if self.backbone.weights == "hed-bsds500" and self.backbone.name != "vgg16":
            raise ValueError(
                f"backbone.weights: hed-bsds500 holds VGG16 layers only, but backbone.name is "
                f"{self.backbone.name!r}; use backbone.name: vgg16 or other weights"
            )
        return self

    @model_validator(mode="after")
    def _unfreeze_in_kept_base(self) -> "Params":
        # After the hed check (its error comes first). Here, so every stage stops on it before doing any
        # work (the data stage included): an unfreeze_from after the cut would otherwise surface only
        # at train_head_aug. Architectures not known by name are checked when their base is built.
        b, unfreeze = self.backbone, self.finetune.unfreeze_from
        layer = b.layer
        if layer == AUTO:
            candidates = probe_layers(b.name)
            if candidates is None:  # not known by name: auto keeps the base's last layer
                return self._check_unfreeze(None)
            if unfreeze == UNFREEZE_AUTO:
                return self  # auto follows whichever cut the probe picks (shallowest: block3_pool)
            # A named layer must lie in every candidate's base, whichever the probe picks.
            unfreeze_layer(b.name, candidates[-1], unfreeze)  # a name the base lacks: that error first
            try:
                unfreeze_layer(b.name, candidates[0], unfreeze)
            except ValueError:
                raise ValueError(f"finetune.unfreeze_from: {unfreeze!r} lies after {candidates[0]}, so it is not in "
                                 f"every cut backbone.layer: auto may choose ({', '.join(candidates)}); set "
                                 f"backbone.layer to a cut that keeps it (e.g. {candidates[-1]}), or "
                                 f"finetune.unfreeze_from: auto") from None
            layer = candidates[0]
        return self._check_unfreeze(layer)

    def _check_unfreeze(self, layer: str | None) -> "Params":
        b, unfreeze = self.backbone, self.finetune.unfreeze_from
        resolved = unfreeze_layer(b.name, layer, unfreeze)
        names = known_layers(b.name)
        if self.augment.mode == "cached" and names and resolved == names[0]:
            which = f"auto resolves to {resolved}" if unfreeze == UNFREEZE_AUTO else repr(resolved)
            raise ValueError(f"finetune.unfreeze_from: {which}, the base's first layer, which leaves the view "
                             f"cache (augment.mode: cached) nothing frozen to store; choose a later layer or "
                             f"backbone.layer, or augment.mode: online")
        return self


def validate_params(raw: dict | None, source: str = PARAMS_FILE) -> Params:
    """Validate a params mapping; raise ConfigError naming every bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (data:, backbone:, ...), got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = error_lines(exc, Params)
        raise ConfigError(f"{source}: invalid parameters:\n  " + "\n  ".join(lines)) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; ConfigError for a missing file, bad YAML or bad values.

    With TLPIPE_RECORD_PARAMS set, the Params come wrapped in `Recorded` (same values, reads noted)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; run from the project root (where dvc.yaml is)") from None
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    params = validate_params(raw, str(path))
    record_to = os.environ.get(RECORD_ENV)
    return Recorded(params, "", Recorder(record_to)) if record_to else params




def param_leaves() -> list[str]:
    """Every leaf key of params.yaml, dotted (`finetune.from`, `data.split`)."""
    return leaf_keys(Params)


def what_params(params) -> dict:
    """Every param the outputs depend on (all leaves but HOW_KEYS), nested as in params.yaml: what the
    report shows. Read key by key, so the visualize stage declares exactly these and switching a how
    key reruns nothing."""
    def attr(node, key: str):
        name = next(n for n, f in type(model_of(node)).model_fields.items() if (f.alias or n) == key)
        return getattr(node, name)

    out: dict = {}
    for key in param_leaves():
        if key in HOW_KEYS:
            continue
        *path, leaf = key.split(".")
        node, target = params, out
        for part in path:
            node, target = attr(node, part), target.setdefault(part, {})
        target[leaf] = attr(node, leaf)
    return out
