"""Parameters and GMACs of a network, counted once and remembered.

Counting builds the network on the meta device and runs the flop counter (torch, seconds for the large
presets). A count depends on the resolved model spec alone, so it is kept by the spec's hash: in
`counts.json` shipped with the package (every preset and every network of the ablation files,
`scripts/update_counts.py` writes it and a test recounts it) and in the user's cache for other networks.
Looking a count up needs no torch; `dimr_lab.nn.describe.counts_for` counts what is missing.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from dimr_lab.spec.schema import to_dict

_shipped: dict[str, Any] | None = None
FIELDS = ("params", "gmacs", "td_params", "shared_params", "branches", "output_sizes", "name")


def model_key(model: Any) -> str:
    """The hash of a resolved model spec (a ModelSpec or its dict); checkpointing does not change a count."""
    from dimr_lab.spec.run_spec import stable_hash

    data = to_dict(model) if not isinstance(model, dict) else dict(model)
    data.pop("checkpointing", None)
    data.pop("attention", None)
    data.pop("attention_fp32", None)
    return stable_hash(data, n=16)


def _cache_file() -> Path:
    root = os.environ.get("DIMR_LAB_CACHE") or Path.home() / ".cache" / "dimr-lab"
    return Path(root) / "counts.json"


def _read(path: Any) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text()) if not hasattr(path, "read_text") else json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def shipped() -> dict[str, Any]:
    """The counts shipped with the package."""
    global _shipped
    if _shipped is None:
        _shipped = _read(resources.files("dimr_lab.spec") / "counts.json")
    return _shipped


def lookup(model: Any) -> dict[str, Any] | None:
    """A remembered count of this network, or None (no torch)."""
    key = model_key(model)
    return shipped().get(key) or _read(_cache_file()).get(key)


def remember(model: Any, info: dict[str, Any]) -> None:
    """Add a count to the user's cache (atomically; a lost race loses nothing but the entry)."""
    from dimr_lab.atomic import atomic_write_text

    path = _cache_file()
    data = _read(path)
    data[model_key(model)] = info
    try:
        atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only cache only costs a recount next time
