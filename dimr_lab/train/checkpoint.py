"""Training checkpoints: one atomic file of plain types and tensors, loadable with weights_only=True.

Layout (format "dimr-lab/1"):
    format, model_spec (resolved dict), model, ema (state dicts), optimizer, scaler (or None), step,
    rng {torch, cuda, numpy, python, noise}, data_position {epoch, index}, elapsed_s, world_size, spec_hash
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dimr_lab.errors import UserError
from dimr_lab.nn.checkpoint import FORMAT
REQUIRED = ("format", "model_spec", "model", "ema", "optimizer", "step", "rng", "data_position")


def get_rng_state(noise: torch.Generator) -> dict[str, Any]:
    """Every RNG state as tensors/plain types (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss_next": py_state[2]},
        "noise": noise.get_state(),
    }


def set_rng_state(state: dict[str, Any], noise: torch.Generator) -> None:
    """Restore what get_rng_state captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    noise.set_state(state["noise"])


def load_checkpoint(path: Path, *, model_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """A checkpoint dict, checked for format and keys (and model spec when given); else UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint there")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a zip, unpickling refused
        raise UserError(f"{path}: corrupt or unreadable checkpoint ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200] if str(err) else ''}); delete it to start over") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a {FORMAT} checkpoint")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise UserError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if model_spec is not None and ckpt["model_spec"] != model_spec:
        raise UserError(f"{path}: checkpoint was written for a different model spec than this run's")
    return ckpt
