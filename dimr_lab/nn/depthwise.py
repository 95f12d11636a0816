"""The ConvNeXt branches' depthwise convolution as one operator torch.compile does not look into.

On the CPU, oneDNN's depthwise convolution is fast on channels-last memory only. Eagerly, the features
are (B, H, W, d) and a permute hands the convolution channels-last memory, forward and backward. With
the network compiled whole, DiMR-tiny's convolution backward averaged 5.5 ms a call against 2.2 ms
eagerly (BENCHMARKS.md), which cost more than the compilation saved. Wrapping forward and backward in
custom operators keeps the eager path's layouts inside compiled graphs (2.3 ms a call again). Same
kernels, same numbers as `nn.Conv2d` on permuted features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.library.custom_op("dimr_lab::depthwise_conv2d", mutates_args=())
def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Tensor, padding: int) -> Tensor:
    """Depthwise 'same' convolution of channels-last features: x (B, H, W, d), weight (d, 1, k, k),
    bias (d,) -> (B, H, W, d)."""
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=padding, groups=weight.shape[0])
    return y.permute(0, 2, 3, 1).contiguous()  # (B, H, W, d); a no-op copy when y is channels-last


@depthwise_conv2d.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, padding: int) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("dimr_lab::depthwise_conv2d_backward", mutates_args=())
def depthwise_conv2d_backward(grad: Tensor, x: Tensor, weight: Tensor, padding: int) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias) of depthwise_conv2d, from the channels-last grad (B, H, W, d)."""
    d = weight.shape[0]
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), weight, [d], [1, 1], [padding, padding], [1, 1],
        False, [0, 0], d, [True, True, True])
    return gx.permute(0, 2, 3, 1).contiguous(), gw, gb


@depthwise_conv2d_backward.register_fake
def _(grad: Tensor, x: Tensor, weight: Tensor, padding: int) -> tuple[Tensor, Tensor, Tensor]:
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight),
            weight.new_empty(weight.shape[0]))


def _setup(ctx, inputs, output) -> None:
    x, weight, _bias, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.padding = padding


def _backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    gx, gw, gb = depthwise_conv2d_backward(grad.contiguous(), x, weight, ctx.padding)
    return gx, gw, gb, None


depthwise_conv2d.register_autograd(_backward, setup_context=_setup)
