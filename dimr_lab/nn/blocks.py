"""Blocks a branch is made of. Each is `block(x, cond) -> x` on channels-last features:
(B, N, d) token sequences for attention blocks, (B, H, W, d) grids for convolutional ones."""

from __future__ import annotations

import torch
from torch import nn

from dimr_lab.nn.attention import SelfAttention
from dimr_lab.nn.depthwise import depthwise_conv2d
from dimr_lab.nn.time_dependent import Cond
from dimr_lab.registry import MLPS, NORMS


def _residual(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return x + h if gate is None else x + gate * h


class Block(nn.Module):
    def __init__(self, spec, branch):  # ModelSpec, BranchSpec
        super().__init__()
        self.cond_dim = spec.time_embed_dim or spec.branches[0].width
        self.norm2 = NORMS.get(spec.norm)(branch.width, self.cond_dim)
        self.mlp = MLPS.get(spec.mlp)(branch.width, branch.mlp_width)

    def _mlp(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        h, gate = self.norm2(x, cond)
        return _residual(x, self.mlp(h), gate)


class TransformerBlock(Block):
    """x += Attn(Norm(x)); x += MLP(Norm(x)) on token sequences (B, N, d)."""

    def __init__(self, spec, branch):
        super().__init__(spec, branch)
        self.norm1 = NORMS.get(spec.norm)(branch.width, self.cond_dim)
        self.attn = SelfAttention(branch.width, branch.heads, backend=spec.attention, qkv_bias=spec.qkv_bias,
                                  fp32=spec.attention_fp32)

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        h, gate = self.norm1(x, cond)  # (B, N, d)
        x = _residual(x, self.attn(h), gate)
        return self._mlp(x, cond)


class ConvNeXtBlock(Block):
    """DiMR's ConvNeXt: x += DWConv_kxk(x) (no norm); x += MLP(Norm(x)) on grids (B, H, W, d)."""

    def __init__(self, spec, branch):
        super().__init__(spec, branch)
        k = branch.kernel
        self.dwconv = nn.Conv2d(branch.width, branch.width, k, padding=k // 2, groups=branch.width)

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        if x.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
            # one operator with a cheaper backward, opaque to torch.compile (nn/depthwise.py); same weights
            h = depthwise_conv2d(x.contiguous(), self.dwconv.weight, self.dwconv.bias, self.dwconv.padding[0])
        else:
            h = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, d)
        return self._mlp(x + h, cond)
