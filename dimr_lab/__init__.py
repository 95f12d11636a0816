"""dimr-lab: architecture ablations of diffusion backbones, starting from DiMR (NeurIPS 2024)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def build_model(spec: Any, *, init_draws: str = "stream", seed: int = 0) -> Any:
    """A network from a model spec (dict, ModelSpec, preset name or TOML path). `init_draws = "by_name"` draws
    each random initial tensor from its own generator keyed by (seed, its name), as train.init_draws does;
    "stream" (the default) draws from the global torch generator."""
    from dimr_lab.nn.network import build_model as _build

    return _build(spec, init_draws=init_draws, seed=seed)


def load_model(path: Any, *, ema: bool = True) -> Any:
    """A network with its weights from a dimr-lab checkpoint (loaded with weights_only=True; its EMA weights
    unless ema=False) or a safetensors export (`dimr-lab export`), in eval mode; a file that is neither is one
    UserError naming it."""
    from dimr_lab.nn.checkpoint import load_model as _load

    return _load(path, ema=ema)
