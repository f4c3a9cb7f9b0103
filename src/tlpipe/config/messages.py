"""Pydantic's validation errors as params.yaml's user reads them: one line per bad key, dotted as in the
file (`head.lr8`), with the keys allowed and a close match for an unknown one."""

from __future__ import annotations

import difflib

from pydantic import BaseModel, ValidationError

def _known_keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _section_model(root: type[BaseModel], path: tuple) -> type[BaseModel] | None:
    model = root
    for part in path:
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        field = fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def describe(err: dict, root: type[BaseModel]) -> str:
    """One line for one pydantic error of `root`'s validation, naming the key as params.yaml writes it."""
    # Pydantic puts union branches ("int", "float", ...) in the location; users only know keys.
    keys = [p for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS)]
    name = ".".join(str(k) for k in keys)
    if err["type"] == "extra_forbidden":
        parent = _section_model(root, tuple(keys[:-1]))
        known = _known_keys(parent) if parent is not None else []
        close = difflib.get_close_matches(str(keys[-1]), known, n=1)
        hint = f" Did you mean {'.'.join(map(str, keys[:-1] + [close[0]]))}?" if close else ""
        where = ".".join(map(str, keys[:-1])) or "the top level"
        return f"{name}: unknown key.{hint} Keys allowed in {where}: {', '.join(known)}"
    got = err.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    msg = err["msg"].removeprefix("Value error, ")
    if not name and msg.split(":")[0].count(".") == 1:  # a check across sections names its own keys
        return msg
    return f"{name or 'params'}: {msg}{got_text}"


_UNION_TAGS = {"int", "float", "str", "bool", "none", "list[str]", "constrained-int", "constrained-float"}


def error_lines(exc: ValidationError, root: type[BaseModel]) -> list[str]:
    """Each distinct line of `exc`, in pydantic's order."""
    lines: list[str] = []
    for err in exc.errors():
        line = describe(err, root)
        if line not in lines:
            lines.append(line)
    return lines
