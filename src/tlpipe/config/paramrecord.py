"""Which params keys a stage reads: the test-only view behind TLPIPE_RECORD_PARAMS.

TLPIPE_RECORD_PARAMS=<file>: `config.load_params()` returns a `Recorded` view that appends
"<script> <key>" to the file for each leaf key read, so tests/test_pipeline.py can hold dvc.yaml's
`params:` to what each stage really reads. Without the variable, load_params returns plain Params.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

RECORD_ENV = "TLPIPE_RECORD_PARAMS"


def leaf_keys(section: type[BaseModel], prefix: str = "") -> list[str]:
    """Every leaf key under a section, dotted as in params.yaml (`finetune.from`, `data.split`)."""
    keys = []
    for name, field in section.model_fields.items():
        key = prefix + (field.alias or name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += leaf_keys(ann, key + ".")
        else:
            keys.append(key)
    return keys


def model_of(node) -> BaseModel:
    """The section behind a view (or the section itself), read without recording anything."""
    return node._model if isinstance(node, Recorded) else node


class Recorder:
    """Appends "<script> <key>" to `path` once per key."""

    def __init__(self, path: str):
        self.path, self.seen = path, set()
        self.script = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "python"

    def __call__(self, *keys: str) -> None:
        new = [k for k in keys if k not in self.seen]
        if new:
            self.seen.update(new)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(f"{self.script} {k}\n" for k in new))


class Recorded:
    """A params section that records each leaf key read; code reading it sees the section's values.

    Handing a whole section to a library function records only the fields that function reads.
    Anything but a field (model_dump, iteration, a property) counts as reading every key below.
    """

    __slots__ = ("_model", "_prefix", "_note")

    def __init__(self, model: BaseModel, prefix: str, note: Recorder):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_note", note)

    def _all(self) -> None:
        self._note(*leaf_keys(type(self._model), self._prefix))

    def __getattr__(self, name: str):
        if name in Recorded.__slots__:  # not set yet (copy, pickle)
            raise AttributeError(name)
        value = getattr(self._model, name)
        field = type(self._model).model_fields.get(name)
        if field is None:
            if not name.startswith("__"):
                self._all()
            return value
        key = self._prefix + (field.alias or name)
        if isinstance(value, BaseModel):
            return Recorded(value, key + ".", self._note)
        self._note(key)
        return value

    def __setattr__(self, name, value):
        raise TypeError("params are read-only")

    def __iter__(self):
        self._all()
        return iter(self._model)

    def __eq__(self, other):
        self._all()
        return self._model == (other._model if isinstance(other, Recorded) else other)

    __hash__ = None

    def __repr__(self) -> str:
        return f"Recorded({self._model!r})"
