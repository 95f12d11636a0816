"""Registries of interchangeable components, by kind and name.

A component is one class registered under a name with a one-line summary:

    @NORMS.register("tdln", "time-dependent LayerNorm (DiMR): gamma(t), beta(t)")
    class TDLayerNorm(nn.Module): ...

This module does not import torch, so listing components stays cheap; the modules that register
components are imported on first look-up (`_ensure_loaded`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from dimr_lab.errors import SpecError, unknown_name_message

# modules whose import registers the built-in components of every kind
_COMPONENT_MODULES = ("dimr_lab.nn.components",)
_loaded = False


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in _COMPONENT_MODULES:
            importlib.import_module(mod)


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    obj: Any
    summary: str


class Registry:
    """Name -> component for one kind (norm, block, mlp, ...)."""

    def __init__(self, kind: str, description: str):
        self.kind, self.description = kind, description
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, summary: str) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = Entry(self.kind, name, obj, summary)
            obj.registry_name = name
            return obj

        return deco

    def names(self) -> list[str]:
        _ensure_loaded()
        return sorted(self._entries)

    def entries(self) -> Iterator[Entry]:
        _ensure_loaded()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def check(self, name: Any, *, file: str | None = None, key: str | None = None) -> str:
        """`name` if registered, else a SpecError listing the known names and the closest one."""
        _ensure_loaded()
        if not isinstance(name, str) or name not in self._entries:
            raise SpecError(unknown_name_message(self.kind, str(name), self._entries), file=file, key=key)
        return name

    def get(self, name: str, *, file: str | None = None, key: str | None = None) -> Any:
        return self._entries[self.check(name, file=file, key=key)].obj

    def __contains__(self, name: str) -> bool:
        _ensure_loaded()
        return name in self._entries


NORMS = Registry("norm", "normalisation layers, plain or conditioned on time/class")
CONDITIONING = Registry("conditioning", "how time and class enter the network")
BLOCKS = Registry("block", "the blocks a branch is made of")
MLPS = Registry("mlp", "feed-forward layers inside blocks")
ATTENTION = Registry("attention", "attention kernels (backends)")
POS_EMBEDS = Registry("pos_embed", "absolute position embeddings of a branch's tokens")
CASCADES = Registry("cascade", "how features pass from a lower-resolution branch to the next")
HEADS = Registry("head", "how a branch turns features into its noise prediction")

KINDS: dict[str, Registry] = {
    r.kind: r for r in (NORMS, CONDITIONING, BLOCKS, MLPS, ATTENTION, POS_EMBEDS, CASCADES, HEADS)
}
