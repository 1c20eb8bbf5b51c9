"""Layers shared by the model files."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _ConvTranspose2dFunction(torch.autograd.Function):
    """conv_transpose2d whose backward is written with ordinary convolutions.

    The gradient of a transposed convolution is a convolution: grad_x = conv2d(grad_y, W) with
    the same stride and padding, and grad_W is that convolution's weight gradient with the roles
    of input and output gradient swapped. The values are the same as autograd's; the point is
    speed: oneDNN's ordinary-convolution kernels run this backward about 2.5x faster on CPU than
    its deconvolution-backward kernels (see benchmarks/README.md).

    Autocast is applied here by hand (inputs cast to the autocast dtype, the weight gradient
    returned in the parameter's dtype), since the backward runs outside autocast."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride: int, padding: int, output_padding: int):
        param_dtype = weight.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        if weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)   # one layout for both kernels
        with torch.autocast(x.device.type, enabled=False):
            y = F.conv_transpose2d(x, weight, bias, stride, padding, output_padding)
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, param_dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        stride, padding, param_dtype = ctx.conv
        grad_y = grad_y.to(x.dtype)
        grad_x = F.conv2d(grad_y, weight, None, stride, padding) if ctx.needs_input_grad[0] else None
        _, grad_w, _ = torch.ops.aten.convolution_backward(
            x, grad_y, weight, None, [stride, stride], [padding, padding], [1, 1],
            False, [0, 0], 1, [False, True, False])
        grad_b = grad_y.sum((0, 2, 3))
        return grad_x, grad_w.to(param_dtype), grad_b.to(param_dtype), None, None, None


class ConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d (square kernel, stride and padding; groups 1) with the faster backward
    above; same parameters, same state_dict, same values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ConvTranspose2dFunction.apply(x, self.weight, self.bias, self.stride[0], self.padding[0],
                                              self.output_padding[0])


class FlattenHWC(nn.Module):
    """[B,C,H,W] -> [B,H*W*C], in TF's (NHWC) order. A free view of a channels_last tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)


class UnflattenHWC(nn.Module):
    """[B,H*W*C] -> [B,C,H,W] read in TF's (NHWC) order, as Keras's Reshape((H,W,C)) does;
    the result is a channels_last view, no copy."""

    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.shape = (height, width, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], *self.shape).permute(0, 3, 1, 2)
