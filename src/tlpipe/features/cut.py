"""The cut: the base's layer the head sees and the pooling that makes it a vector, as the extract stage
stored them (`features/cut.json`). With backbone.layer or backbone.pooling `auto` the linear probe
(features.probe) chose them; the stages after extract read them from here, not from params.yaml, so
they follow the probe's choice and rerun when it changes.
"""

from __future__ import annotations

import json
from pathlib import Path

from tlpipe import atomic
from tlpipe.runtime.errors import FeatureFileError

CUT_FILE = "cut.json"
RERUN = "rerun the extract stage (`dvc repro extract`)"


def write_cut(path, layer: str, pooling: str, chosen_by: str, probe: list[dict]) -> None:
    """`chosen_by`: "probe" (auto) or "params"; `probe`: the probe's table, one row per candidate."""
    atomic.write_json(path, {"layer": layer, "pooling": pooling, "chosen_by": chosen_by, "probe": probe})


def read_cut(path) -> dict:
    """{"layer", "pooling", "chosen_by", "probe"}; FeatureFileError naming the file if missing or damaged."""
    path = Path(path)
    try:
        cut = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FeatureFileError(f"{path}: not found; {RERUN}") from None
    except (OSError, ValueError) as exc:
        raise FeatureFileError(f"{path}: not readable as JSON ({exc}); {RERUN}") from None
    if not isinstance(cut, dict) or not all(isinstance(cut.get(k), str) for k in ("layer", "pooling")):
        raise FeatureFileError(f"{path}: needs string fields layer and pooling; {RERUN}")
    return cut


class CutBackbone:
    """params.backbone with `layer` and `pooling` as the extract stage stored them (every other field
    read through, so a stage's reads of params are still recorded)."""

    def __init__(self, backbone, cut: dict):
        self._backbone, self.layer, self.pooling = backbone, cut["layer"], cut["pooling"]

    def __getattr__(self, name):
        return getattr(self._backbone, name)


def with_cut(backbone, path) -> CutBackbone:
    return CutBackbone(backbone, read_cut(path))


def metrics(path) -> dict:
    """metrics/extract.json's content: the cut and its probe score (validation accuracy)."""
    cut = read_cut(path)
    row = next((r for r in cut.get("probe") or [] if (r["layer"], r["pooling"]) == (cut["layer"], cut["pooling"])), {})
    return {"cut": {"layer": cut["layer"], "pooling": cut["pooling"], "probe_val_accuracy": row.get("val_accuracy")}}
