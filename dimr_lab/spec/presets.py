"""Model presets: one table, one entry per named network (plain data, resolved by `resolve_model`).

Sizes of the released configs (XL/2R, G/2R) are taken from them; the others are marked where a width
was chosen to land on the paper's parameter count. Check any entry with `dimr-lab describe NAME`.
"""

from __future__ import annotations

from typing import Any


def _t(width: int, depth: int, heads: int, patch: int, **kw: Any) -> dict[str, Any]:
    return {"block": "transformer", "width": width, "depth": depth, "heads": heads, "patch": patch, **kw}


def _c(width: int, depth: int, patch: int, **kw: Any) -> dict[str, Any]:
    return {"block": "convnext", "width": width, "depth": depth, "patch": patch, "kernel": 7, **kw}


# DiMR: time through TD norms, class as a token in the Transformer branch, GLU, DiMR cascade, conv heads.
_DIMR = {"conditioning": "norm", "norm": "tdrmsnorm", "outer_norm": "tdln", "mlp": "glu",
         "pos_embed": "learned", "cascade": "dimr", "head": "conv", "long_skip": True, "qkv_bias": False}
_LATENT256 = {"in_channels": 4, "image_size": 32, "num_classes": 1000}
_LATENT512 = {"in_channels": 4, "image_size": 64, "num_classes": 1000}
_PIXEL64 = {"in_channels": 3, "image_size": 64, "num_classes": 1000}
_SHAPES16 = {"in_channels": 3, "image_size": 16, "num_classes": 8}

PRESETS: dict[str, dict[str, Any]] = {
    # ImageNet 256 (latent 32x32x4): the released configs.
    "dimr_xl_2r": {**_DIMR, **_LATENT256, "name": "DiMR-XL/2R",
                   "branches": [_t(960, 39, 16, 2, mlp_width=1920), _c(480, 20, 1, mlp_width=960)]},
    "dimr_g_2r": {**_DIMR, **_LATENT256, "name": "DiMR-G/2R",
                  "branches": [_t(1152, 57, 16, 2, mlp_width=2304), _c(576, 29, 1, mlp_width=1152)]},
    # ImageNet 512 (latent 64x64x4): inferred, XL/2R's branches at 16 (p4) and 32 (p2) plus a third at 64.
    "dimr_xl_3r": {**_DIMR, **_LATENT512, "name": "DiMR-XL/3R",
                   "branches": [_t(960, 39, 16, 4, mlp_width=1920), _c(480, 20, 2, mlp_width=960),
                                _c(240, 20, 1, mlp_width=480)]},
    # ImageNet 64 (pixels): configs not released. The Transformer branch is U-ViT-M's (L's) width and
    # depth at 16x16 tokens (p4); the ConvNeXt widths/depths at 32 and 64 were chosen by a search to land
    # on the paper's counts: M/3R 132.62M (paper 132.9M; its MLP variant 154.15M, Table 2 row 4: 154.0M),
    # L/3R 284.37M (paper 284M).
    "dimr_m_3r": {**_DIMR, **_PIXEL64, "name": "DiMR-M/3R",
                  "branches": [_t(768, 16, 12, 4), _c(256, 8, 2), _c(128, 8, 1)]},
    "dimr_l_3r": {**_DIMR, **_PIXEL64, "name": "DiMR-L/3R",
                  "branches": [_t(1024, 20, 16, 4), _c(384, 2, 2), _c(192, 4, 1)]},
    # Baselines. Known differences from the released code: U-ViT's learned position table also covers its
    # time and class tokens (a learned bias each), ours covers the patches only; DiT's MLP uses the tanh
    # GELU and its output layer starts at zero (xavier-uniform elsewhere), ours exact GELU and trunc-normal
    # 0.02 throughout. DiT-XL/2 is here for sizes and speed; no ablation trains it.
    "uvit_m_4": {**_PIXEL64, "name": "U-ViT-M/4", "conditioning": "token", "norm": "layernorm",
                 "outer_norm": "layernorm", "mlp": "mlp", "pos_embed": "learned", "cascade": "none",
                 "head": "unpatchify_conv", "long_skip": True, "qkv_bias": False,
                 "branches": [_t(768, 16, 12, 4, mlp_width=3072)]},
    "dit_xl_2": {**_LATENT256, "name": "DiT-XL/2", "out_channels": 8, "conditioning": "adaln",
                 "norm": "adaln_zero", "outer_norm": "adaln", "mlp": "mlp", "pos_embed": "sincos",
                 "cascade": "none", "head": "unpatchify", "long_skip": False, "qkv_bias": True,
                 "branches": [_t(1152, 28, 16, 2, mlp_width=4608)]},
    # Small networks for the CPU default and tests (the built-in shapes dataset at 16x16).
    "dimr_tiny_3r": {**_DIMR, **_SHAPES16, "name": "DiMR-tiny/3R",
                     "branches": [_t(96, 4, 4, 4), _c(48, 2, 2), _c(24, 2, 1)]},
    "dimr_tiny_2r": {**_DIMR, **_SHAPES16, "name": "DiMR-tiny/2R",
                     "branches": [_t(96, 4, 4, 2), _c(48, 2, 1)]},
    "uvit_tiny_4": {**_SHAPES16, "name": "U-ViT-tiny/4", "conditioning": "token", "norm": "layernorm",
                    "outer_norm": "layernorm", "mlp": "mlp", "cascade": "none", "head": "unpatchify_conv",
                    "branches": [_t(96, 4, 4, 4)]},
    "dit_tiny_4": {**_SHAPES16, "name": "DiT-tiny/4", "conditioning": "adaln", "norm": "adaln_zero",
                   "outer_norm": "adaln", "mlp": "mlp", "pos_embed": "sincos", "cascade": "none",
                   "head": "unpatchify", "long_skip": False, "qkv_bias": True,
                   "branches": [_t(96, 4, 4, 4)]},
}

# The paper's sizes, for `describe` and the preset tests: (params, GMACs or None, relative tolerance).
PAPER_SIZES: dict[str, tuple[float, float | None, float]] = {
    "dimr_xl_2r": (505.05e6, 160.2, 0.002),
    "dimr_g_2r": (1056.35e6, 331.1, 0.002),
    "dimr_xl_3r": (525.03e6, 206.1, 0.002),
    "dit_xl_2": (675e6, 118.6, 0.01),
    "uvit_m_4": (130.9e6, None, 0.01),
    "dimr_m_3r": (132.9e6, None, 0.01),
    "dimr_l_3r": (284e6, None, 0.01),
}
