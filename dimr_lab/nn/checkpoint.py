"""Model checkpoints: weights plus the resolved model spec, loaded with `weights_only=True`.

Format "dimr-lab/1": {"format", "model_spec": dict, "model": state_dict, "ema": state_dict | None, ...};
training checkpoints add optimizer, step and RNG states under other keys and load the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dimr_lab.atomic import atomic_save
from dimr_lab.errors import SpecError, UserError

FORMAT = "dimr-lab/1"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict; a missing, corrupt or foreign file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors, truncated zip archives, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a readable checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt or "model_spec" not in ckpt:
        raise UserError(f"{path}: not a dimr-lab checkpoint (expected format {FORMAT!r} with model and model_spec; "
                        f"released DiMR weights convert with `dimr-lab convert-official`)")
    return ckpt


def save_model(path: str | Path, model: torch.nn.Module, *, ema: torch.nn.Module | None = None, **extra: Any) -> None:
    from dimr_lab.spec.schema import to_dict

    atomic_save({"format": FORMAT, "model_spec": to_dict(model.spec), "model": model.state_dict(),
                 "ema": ema.state_dict() if ema is not None else None, **extra}, path)


def load_model(path: str | Path, *, ema: bool = True) -> torch.nn.Module:
    """The network of a checkpoint, with its EMA weights when present and `ema` is set."""
    from dimr_lab.nn.network import build_model
    from dimr_lab.spec.model_spec import resolve_model

    ckpt = read_checkpoint(path)
    try:
        spec = resolve_model(ckpt["model_spec"], file=str(path), key="model_spec")
    except SpecError as err:
        raise UserError(f"{path}: its model spec is invalid: {err}") from None
    model = build_model(spec)
    state = ckpt["ema"] if ema and ckpt.get("ema") else ckpt["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not match its model spec ({str(err).splitlines()[0]})") from None
    return model.eval()
