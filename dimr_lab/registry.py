"""Registries of interchangeable components, by kind and name (torch-free, timm-style lazy entries).

An entry is metadata plus a lazy import path: its name, kind, one-line summary, the spec keys it reads,
kind-specific facts the spec layer checks (a norm's `condition`, a block's `uses_attention`, ...), and
`target = "module:attr"`, imported only when the component is built. So listing components, validating
specs and planning runs never import torch.

The built-in entries are declared in `dimr_lab.catalog`; adding one is its module plus one line there:

    NORMS.add("mynorm", "dimr_lab.nn.mynorm:MyNorm", "one line for `dimr-lab components`", condition="time")

Code outside the package can register an object it already holds with the decorator form:

    @NORMS.register("mynorm", "one line", condition="time")
    class MyNorm(Norm): ...
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from dimr_lab.errors import SpecError, unknown_name_message

_loaded = False


def _ensure_loaded() -> None:
    """Declare the built-in entries (dimr_lab.catalog, torch-free) on first use."""
    global _loaded
    if not _loaded:
        _loaded = True
        importlib.import_module("dimr_lab.catalog")


@dataclass
class Entry:
    """One registered component: metadata now, the object on first `load()`."""

    kind: str
    name: str
    summary: str
    target: str = ""                      # "module:attr", imported lazily
    keys: tuple[str, ...] = ()            # the spec keys it reads (dotted, e.g. "data.root")
    meta: Mapping[str, Any] = field(default_factory=dict)
    obj: Any = None

    def load(self) -> Any:
        """The registered object (imports its module the first time)."""
        if self.obj is None:
            module, _, attr = self.target.partition(":")
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self.obj = obj
        return self.obj

    def __getitem__(self, key: str) -> Any:
        return self.meta[key]


class Registry:
    """Name -> Entry for one kind (norm, block, dataset, sampler, ...).

    `meta_fields` are the facts every entry of the kind must declare, with their defaults."""

    def __init__(self, kind: str, description: str, group: str, meta_fields: Mapping[str, Any] | None = None):
        self.kind, self.description, self.group = kind, description, group
        self.meta_fields = dict(meta_fields or {})
        self._entries: dict[str, Entry] = {}

    def _add(self, entry: Entry) -> Entry:
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} registered twice")
        unknown = set(entry.meta) - set(self.meta_fields)
        if unknown:
            raise ValueError(f"{self.kind} {entry.name!r}: unknown metadata {sorted(unknown)}; "
                             f"a {self.kind} declares {sorted(self.meta_fields) or 'none'}")
        entry.meta = {**self.meta_fields, **entry.meta}
        self._entries[entry.name] = entry
        return entry

    def add(self, name: str, target: str, summary: str, *, keys: tuple[str, ...] = (), **meta: Any) -> None:
        """Declare an entry whose object is imported from `target` ("module:attr") when first built."""
        if ":" not in target:
            raise ValueError(f"{self.kind} {name!r}: target must be 'module:attr', got {target!r}")
        self._add(Entry(self.kind, name, summary, target, tuple(keys), meta))

    def register(self, name: str, summary: str, *, keys: tuple[str, ...] = (), **meta: Any) -> Callable[[Any], Any]:
        """Decorator: register an object that is already imported (code outside the catalog)."""

        def deco(obj: Any) -> Any:
            _ensure_loaded()
            target = f"{getattr(obj, '__module__', '')}:{getattr(obj, '__qualname__', name)}"
            self._add(Entry(self.kind, name, summary, target, tuple(keys), meta, obj))
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

    def entry(self, name: str, *, file: str | None = None, key: str | None = None) -> Entry:
        return self._entries[self.check(name, file=file, key=key)]

    def meta(self, name: str, item: str) -> Any:
        """A declared fact of an entry (no import)."""
        return self.entry(name).meta[item]

    def get(self, name: str, *, file: str | None = None, key: str | None = None) -> Any:
        """The registered object (imports it)."""
        return self.entry(name, file=file, key=key).load()

    def __contains__(self, name: object) -> bool:
        _ensure_loaded()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r})"


# --- the network (dimr_lab.nn) ---
NORMS = Registry("norm", "normalisation layers, plain or conditioned on time/class", "model",
                 {"condition": "none",           # what it reads: none | time (TD tensors) | vector (adaLN)
                  "gated": False})               # returns a gate for a residual branch (blocks only)
CONDITIONING = Registry("conditioning", "how time and class enter the network", "model",
                        {"vector": False})       # provides the adaLN condition vector
BLOCKS = Registry("block", "the blocks a branch is made of", "model", {"uses_attention": False})
MLPS = Registry("mlp", "feed-forward layers inside blocks", "model", {"default_ratio": 4})
ATTENTION = Registry("attention", "attention kernels (backends)", "model")
POS_EMBEDS = Registry("pos_embed", "absolute position embeddings of a branch's tokens", "model",
                      {"width_multiple": 1})
CASCADES = Registry("cascade", "how features pass from a lower-resolution branch to the next", "model",
                    {"uses_features": True})
HEADS = Registry("head", "how a branch turns features into its noise prediction", "model",
                 {"unpatchify": False})

# --- a run (data, diffusion, sampling, evaluation) ---
DATASETS = Registry("dataset", "training data", "run",
                    {"kind": "pixels", "channels": 3, "classes": 0, "procedural": False, "classifier": True})
SCHEDULES = Registry("schedule", "noise schedules (forward process)", "run", {"continuous": False})
TIME_INPUTS = Registry("time_input", "what the network is given as time", "run")
SAMPLERS = Registry("sampler", "ODE solvers that turn noise into samples", "run",
                    {"needs_discrete": False, "orders": (1, 2, 3)})
EXTRACTORS = Registry("feature_extractor", "feature extractors for FID/KID/IS/precision-recall", "run",
                      {"needs_images": True})
METRICS = Registry("metric", "evaluation metrics", "run", {"needs_real": False, "needs_classifier": False})
LR_SCHEDULES = Registry("lr_schedule", "learning-rate schedules", "run", {"uses_total": False})

KINDS: dict[str, Registry] = {
    r.kind: r for r in (NORMS, CONDITIONING, BLOCKS, MLPS, ATTENTION, POS_EMBEDS, CASCADES, HEADS,
                        DATASETS, SCHEDULES, TIME_INPUTS, SAMPLERS, EXTRACTORS, METRICS, LR_SCHEDULES)
}
