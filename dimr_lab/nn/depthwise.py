"""The ConvNeXt branches' depthwise convolution on the CPU: one operator with its own backward, which
torch.compile does not look into.

oneDNN's depthwise convolution is fast on channels-last memory only. The features are (B, H, W, d), so a
permute hands the convolution channels-last memory, forward and backward. Two things this operator does
that `nn.Conv2d` on permuted features does not:

- Compiled whole (`train.compile` on the CPU), DiMR-tiny's convolution backward averaged 5.5 ms a call
  against 2.2 ms eagerly (BENCHMARKS.md), which cost more than the compilation saved; as an opaque
  operator it keeps the eager layouts inside compiled graphs (2.3 ms a call again).
- Its backward asks oneDNN for the input and weight gradients in two calls and sums the bias gradient
  itself. oneDNN's one call for all three spends about as long on the bias gradient as on the weight
  gradient (DiMR-tiny's 16x16, d = 24 convolution, one thread: 3.6 ms for the three, 0.5 + 2.3 ms for
  the input and weight gradients alone, 0.04 ms for the sum; BENCHMARKS.md).

The forward, the input gradient and the weight gradient are the same kernels and bit for bit the numbers
of `nn.Conv2d`; the bias gradient is the same sum in another order (float rounding).
"""

# no `from __future__ import annotations`: torch.library.custom_op infers each operator's schema from its
# annotations, and real types work on every torch with custom_op (2.4 on) without it evaluating strings
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import flop_counter


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
    g, xc = grad.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2)  # (B, d, H, W) views of channels-last memory

    def conv_backward(mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ops.aten.convolution_backward(g, xc, weight, [d], [1, 1], [padding, padding], [1, 1],
                                                   False, [0, 0], d, mask)

    gx = conv_backward([True, False, False])[0]  # (B, d, H, W), channels-last
    # (d, 1, k, k); oneDNN gives the size-1 dimension stride 1, and DDP (which checks a gradient's strides
    # against its bucket's) warned of it every step: the weight's own strides, the same memory
    gw = conv_backward([False, True, False])[1].reshape(-1).view_as(weight)
    gb = grad.reshape(-1, d).sum(0)  # (d,)
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


def _nchw(shape) -> list[int]:
    b, h, w, d = shape
    return [b, d, h, w]


@flop_counter.register_flop_formula(torch.ops.dimr_lab.depthwise_conv2d)
def _depthwise_flops(x_shape, w_shape, _bias_shape, _padding, *, out_shape=None, **kwargs) -> int:
    """What torch.utils.flop_counter counts for the convolution the operator runs (`describe`, MFU)."""
    return flop_counter.conv_flop_count(_nchw(x_shape), w_shape, _nchw(out_shape))


@flop_counter.register_flop_formula(torch.ops.dimr_lab.depthwise_conv2d_backward)
def _depthwise_backward_flops(_grad_shape, x_shape, w_shape, _padding, *, out_shape=None, **kwargs) -> int:
    """The input and the weight gradient: each as many as the forward (the bias gradient is not counted,
    as for aten's convolution_backward)."""
    return 2 * flop_counter.conv_flop_count(_nchw(x_shape), w_shape, _nchw(x_shape))
