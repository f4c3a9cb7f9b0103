"""params.yaml validation: typos, wrong types and bad ranges stop with a message naming the key."""

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tlpipe.config import Params, load_params, validate_params
from tlpipe.runtime.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def raw():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def with_value(raw, section, key, value):
    raw = copy.deepcopy(raw)
    raw.setdefault(section, {})[key] = value
    return raw


def error_text(raw):
    with pytest.raises(ConfigError) as info:
        validate_params(raw)
    return str(info.value)


def test_repo_params_file_is_valid_and_matches_defaults():
    params = load_params(REPO / "params.yaml")
    # The shipped file spells out every default: a key added to the schema but not the file shows here.
    assert params == Params()
    assert params.head.lr == params.head_aug.lr == params.finetune.lr == "auto"
    assert params.head_aug.epochs == params.finetune.epochs == "auto"
    assert params.finetune.from_ == "head_aug"


def test_mistyped_key_is_named_with_a_suggestion(raw):
    text = error_text(with_value(raw, "head", "lr8", 1))
    assert "head.lr8: unknown key" in text
    assert "Did you mean head.lr?" in text


def test_unknown_section_lists_the_sections(raw):
    raw["hed"] = {"lr": 1}
    text = error_text(raw)
    assert "hed: unknown key" in text and "Did you mean head?" in text


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("head", "lr", -1.0, "head.lr: Input should be greater than 0"),
        ("head", "epochs", "30", "head.epochs: Input should be a valid integer"),
        ("head", "dropout", 1.0, "head.dropout: Input should be less than 1"),
        ("backbone", "pooling", "mean", "backbone.pooling: Input should be 'flatten', 'avg', 'max' or 'auto'"),
        ("backbone", "name", "vgg17", "backbone.name: Input should be 'vgg16'"),
        ("backbone", "image_size", 8, "backbone.image_size: Input should be greater than or equal to 32"),
        ("augment", "fill_mode", "mirror", "augment.fill_mode"),
        ("data", "sha256", "abc", "data.sha256: must be 64 hexadecimal digits"),
        ("evaluate", "models", ["head", "head"], "evaluate.models: lists a model twice"),
        ("finetune", "from", "finetuned", "finetune.from: Input should be 'head_aug' or 'head'"),
    ],
)
def test_bad_values_are_named(raw, section, key, value, expected):
    assert expected in error_text(with_value(raw, section, key, value))


def test_split_fractions_must_add_up(raw):
    text = error_text(with_value(raw, "data", "split", {"train": 0.5, "validation": 0.3, "test": 0.3}))
    assert "data.split: fractions must add up to 1 (they add up to 1.1)" in text


def test_split_needs_all_three_keys(raw):
    text = error_text(with_value(raw, "data", "split", {"train": 0.5, "test": 0.5}))
    assert "needs exactly the keys train, validation, test" in text


def test_split_counts_per_class_are_accepted(raw):
    params = validate_params(with_value(raw, "data", "split", {"train": 1000, "validation": 500, "test": 500}))
    assert params.data.split == {"train": 1000, "validation": 500, "test": 500}


@pytest.mark.parametrize("split,expected", [
    ({"train": 5, "validation": 0, "test": 1}, "counts per class must be positive integers"),
    ({"train": 1.0, "validation": 0.0, "test": 0.0}, "fractions must each lie strictly between 0 and 1"),
    ({"train": 0.5, "validation": 0.5, "test": float("nan")}, "fractions must each lie strictly between 0 and 1"),
    ({"train": 0.5, "validation": 0.3, "test": 0.3}, "fractions must add up to 1 (they add up to 1.1)"),
])
def test_params_and_the_data_stage_apply_one_split_rule(raw, split, expected):
    from tlpipe.data.split import parse_split

    assert f"data.split: {expected}" in error_text(with_value(raw, "data", "split", split))
    with pytest.raises(ConfigError) as err:
        parse_split(split)  # what build_dataset checks, for callers that skip params.yaml
    assert str(err.value).startswith(f"data.split: {expected}")


def test_hed_weights_need_vgg16(raw):
    raw = with_value(raw, "backbone", "weights", "hed-bsds500")
    raw["backbone"]["name"] = "resnet50"
    assert "hed-bsds500 holds VGG16 layers only" in error_text(raw)


def test_every_error_is_reported_at_once(raw):
    raw = with_value(raw, "head", "lr", 0.0)
    raw["compute"]["precision"] = "float16"
    text = error_text(raw)
    assert "head.lr" in text and "compute.precision" in text


def test_scientific_notation_as_dvc_writes_it(tmp_path, raw):
    # `dvc exp run -S head.lr=1e-4` writes `lr: 1e-4`, which plain PyYAML would read as a string.
    text = (REPO / "params.yaml").read_text()
    at = text.index("head_aug:")
    text = text[:at] + text[at:].replace("lr: auto", "lr: 1e-4", 1)  # head_aug's
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml").head_aug.lr == pytest.approx(1e-4)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="params.yaml: not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("head: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_params(tmp_path / "params.yaml")


def test_empty_file_gives_defaults(tmp_path):
    (tmp_path / "params.yaml").write_text("")
    assert load_params(tmp_path / "params.yaml") == Params()


leaf = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                 st.text(max_size=8))
tree = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                  st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)
section_names = st.sampled_from(sorted(Params.model_fields) + ["bogus"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(section_names, st.one_of(tree, st.dictionaries(st.text(max_size=10), tree, max_size=5)),
                       max_size=4))
def test_random_dicts_either_validate_or_raise_config_error(candidate):
    try:
        validate_params(candidate)
    except ConfigError as exc:
        assert str(exc).startswith("params.yaml: invalid parameters")


def test_every_choice_is_implemented():
    # config/choices.py holds the names so validating params never imports TensorFlow; the implementations
    # must offer exactly those.
    from tlpipe.config.choices import BACKBONES, POOLINGS
    from tlpipe.features.backbones import ARCHS, POOL_CLASSES

    assert list(BACKBONES) == list(ARCHS)
    assert list(POOLINGS) == list(POOL_CLASSES)


# ---------------------------------------------------------------- finetune.unfreeze_from follows backbone.layer

@pytest.mark.parametrize("name, layer, expected", [
    ("vgg16", None, "block5_conv1"), ("vgg16", "block5_pool", "block5_conv1"),
    ("vgg16", "block4_pool", "block4_conv1"), ("vgg16", "block3_pool", "block3_conv1"),
    ("vgg16", "block4_conv2", "block4_conv1"), ("vgg19", None, "block5_conv1"), ("vgg19", "block3_pool", "block3_conv1"),
])
def test_unfreeze_auto_is_the_last_block_the_base_keeps(name, layer, expected):
    from tlpipe.config.choices import unfreeze_layer

    assert unfreeze_layer(name, layer, "auto") == expected
    p = validate_params({"backbone": {"name": name, "layer": layer}})
    assert p.finetune.unfreeze_from == "auto"


def test_unfreeze_from_after_the_cut_names_both_keys(raw):
    raw = with_value(with_value(raw, "backbone", "layer", "block4_pool"), "finetune", "unfreeze_from", "block5_conv1")
    text = error_text(raw)
    assert "finetune.unfreeze_from: 'block5_conv1' lies after the cut (backbone.layer: block4_pool)" in text
    assert "residual" not in text and "params: " not in text
    inner = with_value(raw, "finetune", "unfreeze_from", "block4_conv2")
    assert validate_params(inner).finetune.unfreeze_from == "block4_conv2"


def test_unknown_unfreeze_from_lists_the_kept_layers(raw):
    text = error_text(with_value(with_value(raw, "backbone", "layer", "block2_pool"),
                                 "finetune", "unfreeze_from", "block9_conv1"))
    assert "finetune.unfreeze_from: vgg16 has no layer 'block9_conv1'; choose one of: block1_conv1," in text
    assert "block2_pool (up to backbone.layer: block2_pool), or auto" in text and "block3_conv1" not in text


def test_unfreeze_auto_needs_a_known_architecture_and_a_frozen_layer_for_the_cache(raw):
    other = with_value(raw, "backbone", "name", "resnet50")
    assert "finetune.unfreeze_from: auto is defined for vgg16 and vgg19" in error_text(other)
    validate_params(with_value(other, "finetune", "unfreeze_from", "conv5_block1_1_conv"))  # checked once built
    first = with_value(raw, "backbone", "layer", "block1_pool")
    assert "auto resolves to block1_conv1, the base's first layer" in error_text(first)
    validate_params(with_value(first, "augment", "mode", "online"))


CPUINFO = "processor\t: {n}\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512f {extra}\n\n"


@pytest.mark.parametrize("extra, native", [("avx512_bf16", True), ("amx_bf16 amx_tile", True),
                                           ("avx512_vnni", False), ("", False), ("no_avx512_bf16x", False)])
def test_native_bfloat16_reads_the_cpu_flags(tmp_path, monkeypatch, extra, native):
    from tlpipe.runtime import cpu

    info = tmp_path / "cpuinfo"
    info.write_text("".join(CPUINFO.format(n=n, extra=extra) for n in range(2)))
    assert cpu.native_bfloat16(info) is native  # a flag's name inside another word is not the flag
    assert cpu.native_bfloat16(tmp_path / "absent") is False


@pytest.mark.parametrize("extra, says", [("avx512_bf16", "this CPU lists avx512_bf16 or amx_bf16"),
                                         ("", "this CPU lists neither, so float32 is the fast one here")])
def test_auto_precision_is_refused_with_what_this_cpu_has(tmp_path, monkeypatch, raw, extra, says):
    # DVC records the param as written: auto would let a bfloat16 machine's outputs pass for float32 ones.
    from tlpipe.runtime import cpu

    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO.format(n=0, extra=extra))
    monkeypatch.setattr(cpu, "CPUINFO", info)
    text = error_text(with_value(raw, "compute", "precision", "auto"))
    assert "compute.precision" in text and "write the precision: bfloat16" in text and says in text
    assert validate_params(with_value(raw, "compute", "precision", "bfloat16")).compute.precision == "bfloat16"


@pytest.mark.parametrize("section", ["head_aug", "finetune"])
def test_schedule_is_constant_or_cosine(raw, section):
    assert validate_params(with_value(raw, section, "schedule", "cosine")).model_dump()[section]["schedule"] == "cosine"
    assert f"{section}.schedule" in error_text(with_value(raw, section, "schedule", "linear"))


def test_what_params_are_every_key_but_the_how_keys(raw):
    # What the report shows and visualize declares: a how key (compute.engine ...) reruns nothing.
    from tlpipe.config import HOW_KEYS, param_leaves, what_params
    from tlpipe.report.build import params_text

    values = what_params(validate_params(raw))
    shown = {f"{s}.{k}" for s, section in values.items() for k in section}
    assert shown == set(param_leaves()) - set(HOW_KEYS)
    assert values["finetune"]["from"] == raw["finetune"]["from"]  # the alias, as params.yaml spells it
    text = params_text(values)
    assert yaml.safe_load(text) == values and "engine" not in text and "strategy" not in text
