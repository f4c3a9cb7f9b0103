"""YAML as params.yaml is written: PyYAML's safe loader with YAML 1.2's exponent floats."""

from __future__ import annotations

import re

import yaml

class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML reads `1e-4` (what `dvc exp run -S head.lr=1e-4` writes) as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def load_yaml(text: str):
    """The parsed document; yaml.YAMLError when it is not valid YAML."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
