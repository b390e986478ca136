"""Typed option objects: reading a config block (or keyword overrides) into a dataclass, with an unknown
key named together with its closest valid one, so a misspelt option fails instead of being ignored."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, fields
from typing import Any, TypeVar

__all__ = ["check_keys", "parse_options", "with_overrides"]

T = TypeVar("T")


def check_keys(given: Iterable[str], valid: Sequence[str], prefix: str, valid_text: str | None = None) -> None:
    """A key of ``given`` not in ``valid`` (a typo, e.g. through Hydra's ``+key=`` hint) is a ValueError
    naming ``<prefix>.<key>``, the closest valid key and ``valid_text`` (default: the valid keys)."""
    unknown = [k for k in given if k not in valid]
    if unknown:
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f" (did you mean {prefix}.{close[0]}?)" if close else ""
        raise ValueError(f"{prefix}.{unknown[0]} is not an option{hint}; "
                         f"{valid_text or f'valid keys of {prefix}: ' + ', '.join(valid)}. Fix or remove that key.")


def parse_options(cls: type[T], values: Mapping[str, Any], prefix: str) -> T:
    """``cls(**values)`` for a dataclass of config options; unknown or missing keys name ``<prefix>.<key>``."""
    names = [f.name for f in fields(cls)]
    check_keys(values, names, prefix)
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in values]
    if missing:
        raise ValueError(f"{prefix}.{missing[0]} is required; valid keys of {prefix}: {', '.join(names)}")
    return cls(**values)


def with_overrides(cls: type[T], options: T | None, overrides: Mapping[str, Any]) -> T:
    """``options`` (default ``cls()``) with the fields in ``overrides`` replaced: the keyword form of the
    functions that take an options object, e.g. ``dse(x, seed=3)``. An unknown keyword names ``<cls>.<key>``."""
    base = cls() if options is None else options
    if not overrides:
        return base
    check_keys(overrides, [f.name for f in fields(cls)], cls.__name__)
    return dataclasses.replace(base, **overrides)
