"""Every key a run spec takes, read from the spec dataclasses themselves (torch-free).

`spec_keys()` lists them as dotted keys (`model.norm`, `model.branches.N.block`, `train.lr`, ...) with their
type, default, what is allowed and their help text: `dimr-lab keys` prints it. `choosing_keys(kind)` names
the keys whose value is a name of that kind of component (`dimr-lab components` prints them under its
table), so a registry no spec field takes shows up as chosen by nothing.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Iterator

from dimr_lab.registry import KINDS, Registry
from dimr_lab.spec.model_spec import BranchSpec, ModelSpec
from dimr_lab.spec.run_spec import RunSpec
from dimr_lab.spec.schema import _schema, _type_name

SECTIONS = ("model", "data", "diffusion", "train", "sample", "eval", "track")


@dataclass(frozen=True)
class Key:
    """One spec key: its dotted name, type, default, what is allowed, and its help text."""

    key: str
    type: str
    default: Any
    allowed: str
    help: str
    registry: Registry | None = None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _allowed(meta: typing.Mapping[str, Any]) -> str:
    choices = meta.get("choices")
    if isinstance(choices, Registry):
        return f"{choices.kind} names: {', '.join(choices.names())}"
    if choices is not None:
        return ", ".join(repr(c) for c in choices)
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f"{lo} to {hi}"
    if lo is not None:
        return f">= {lo}"
    if hi is not None:
        return f"<= {hi}"
    return ""


def _fields(cls: type, prefix: str) -> Iterator[Key]:
    hints, fields = _schema(cls)  # the types and init fields from_dict reads
    for f in fields.values():
        key = f"{prefix}.{f.name}"
        if f.name == "branches" and cls is ModelSpec:  # a list of tables: one entry per branch, lowest first
            yield Key(key, "list of tables", None, "", "one per branch, lowest resolution first: model.branches.N.*")
            yield from _fields(BranchSpec, f"{key}.N")
            continue
        choices = f.metadata.get("choices")
        yield Key(key, _type_name(hints[f.name]), _default(f), _allowed(f.metadata), f.metadata.get("help", ""),
                  choices if isinstance(choices, Registry) else None)


def spec_keys(section: str | None = None) -> list[Key]:
    """Every key of a run spec (or of one section), in the order the spec dataclasses declare them.

    `model.*` defaults are the bare model spec's; a preset (`model.preset`) sets its own."""
    hints, _ = _schema(RunSpec)
    out: list[Key] = []
    for name in SECTIONS:
        if section is not None and name != section:
            continue
        if name == "model":
            out.append(Key("model.preset", "string", None, "a preset name (`dimr-lab describe NAME`)",
                           "start from a preset and override any key below"))
        out.extend(_fields(hints[name], name))
    return out


def choosing_keys(kind: str) -> list[str]:
    """The spec keys whose value names a component of `kind` (e.g. norm: model.norm, model.outer_norm)."""
    registry = KINDS[kind]
    return [k.key for k in spec_keys() if k.registry is registry]
