"""Attention kernels (backends) and the multi-head self-attention layer that uses them.

A backend is a function `(q, k, v) -> out` on (B, heads, N, head_dim) tensors.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dimr_lab.registry import ATTENTION



def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, h, N, N)
    return scores.softmax(dim=-1) @ v  # (B, h, N, hd)


_warned_xformers = False


@functools.cache
def _xformers_ops() -> tuple[object, str]:
    """(xformers.ops or None, why it is None), imported once."""
    try:
        import xformers.ops as xops
    except ImportError:
        return None, "xformers is not installed"
    except Exception as err:  # built for another torch or CUDA: its import raises more than ImportError
        first = str(err).splitlines()[0][:200] if str(err) else ""
        return None, f"xformers does not import ({type(err).__name__}: {first})"
    return xops, ""


def _warn_xformers_fallback(why: str) -> None:
    global _warned_xformers
    if not _warned_xformers:
        warnings.warn(f"attention 'xformers': {why}; using 'sdpa' instead", stacklevel=3)
        _warned_xformers = True


def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    xops, why = _xformers_ops()
    if xops is None or not q.is_cuda:
        _warn_xformers_fallback(why or "xformers has no CPU kernels")
        return sdpa_attention(q, k, v)
    # xformers takes (B, N, heads, head_dim)
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention: qkv projection, a backend, output projection."""

    def __init__(self, dim: int, heads: int, *, backend: str = "sdpa", qkv_bias: bool = False,
                 fp32: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.fp32 = heads, dim // heads, fp32
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = ATTENTION.get(backend)
        if self.backend is xformers_attention and _xformers_ops()[0] is None:
            # decided here, not in forward: torch.compile would trace the failing import at every attention
            _warn_xformers_fallback(_xformers_ops()[1])
            self.backend = sdpa_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
        q, k, v = qkv.unbind(0)
        if self.fp32:  # float32 attention even under autocast (opt-in; not what the released code gets)
            if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
                with torch.autocast(device_type=x.device.type, enabled=False):
                    out = self.backend(q.float(), k.float(), v.float())
            else:
                out = self.backend(q.float(), k.float(), v.float())
            out = out.to(x.dtype)
        else:
            out = self.backend(q, k, v)  # (B, h, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))
