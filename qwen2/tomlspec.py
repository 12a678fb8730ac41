"""Dataclasses from TOML tables, checked: the training recipes (qwen2.train.recipe) and the data
pipeline's (qwen2.data.pipeline) both read their files through `build`, so an unknown key or a
value of the wrong type is an error naming the file and key, never a silently ignored typo.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any


class RecipeError(ValueError):
    """A recipe that cannot be run as written; the message names the file and key."""


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RecipeError(f"{path}: cannot read ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from None


def build(cls: type, data: Any, where: str, **extra: Any) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a table, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; known: {sorted(n for n in names if n not in extra)}")
    for key, value in data.items():
        expected = names[key].type
        if not type_ok(value, str(expected)):
            raise RecipeError(f"{where}.{key}: {value!r} is not {expected}")
    try:
        return cls(**data, **extra)
    except (TypeError, ValueError) as e:  # ValueError: the dataclass's own checks (__post_init__)
        raise RecipeError(f"{where}: {e}") from None


_KINDS = {"int": int, "float": (int, float), "str": str, "bool": bool, "dict": dict, "list": list}


def type_ok(value: Any, annotation: str) -> bool:
    """Whether a TOML value fits a field's annotation (a string: "int", "str | None", "dict[str, float]")."""
    options = [option.strip().split("[")[0] for option in annotation.split("|")]
    if value is None:
        return "None" in options
    if isinstance(value, bool):
        return "bool" in options
    return any(isinstance(value, _KINDS[o]) for o in options if o in _KINDS)
