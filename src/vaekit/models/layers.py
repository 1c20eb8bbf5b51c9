"""Layers shared by the model files."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def onednn_runs(x: torch.Tensor) -> bool:
    """Whether oneDNN's own convolution kernels (torch.ops.mkldnn, the ones torch.compile emits for
    CPU convolutions, with a ReLU fused in) run on `x`: CPU, fp32, or bf16 where the CPU has bf16
    instructions (elsewhere they refuse bf16, and torch's generic kernels emulate it, slowly)."""
    if x.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class _ConvTranspose2dFunction(torch.autograd.Function):
    """conv_transpose2d, optionally followed by a ReLU, with a faster backward on CPU.

    Autograd's backward asks oneDNN's deconvolution kernel for the input, weight and bias
    gradients in one call, and its bias-gradient path is slow: 4.5 ms against 0.9 ms without it
    for the seed's 64->32 layer at batch 100 (benchmarks/convt_backward.py). Here the kernel
    computes the input and weight gradients and the bias gradient is a plain sum. With `relu`,
    the ReLU runs inside the convolution kernel (oneDNN post-op) on CPU, saving a pass over the
    largest activations, and its backward is applied to the incoming gradient here.

    Autocast is applied here by hand (inputs cast to the autocast dtype, the parameter gradients
    returned in the parameters' dtype), since the backward runs outside autocast."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride: int, padding: int, output_padding: int, relu: bool):
        param_dtype = weight.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        if weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)   # one layout for both kernels
        with torch.autocast(x.device.type, enabled=False):
            if relu and onednn_runs(x) and not torch.compiler.is_compiling():   # its fake kernel takes packed weights only
                y = torch.ops.mkldnn._convolution_transpose_pointwise.default(
                    x, weight, bias, [padding] * 2, [output_padding] * 2, [stride] * 2, [1, 1], 1, "relu", [None], "")
            else:
                y = F.conv_transpose2d(x, weight, bias, stride, padding, output_padding)
                y = torch.relu_(y) if relu else y
        ctx.save_for_backward(x, weight, y if relu else None)
        ctx.conv = (stride, padding, output_padding, param_dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, y = ctx.saved_tensors
        stride, padding, output_padding, param_dtype = ctx.conv
        grad_y = grad_y.to(x.dtype)
        if y is not None:
            grad_y = torch.ops.aten.threshold_backward.default(grad_y, y, 0)   # ReLU's backward: zero where y <= 0
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward.default(
            grad_y, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], True, [output_padding] * 2, 1,
            [ctx.needs_input_grad[0], True, False])
        grad_b = grad_y.sum((0, 2, 3))
        return grad_x, grad_w.to(param_dtype), grad_b.to(param_dtype), None, None, None, None


class ConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d (square kernel, stride and padding; groups 1) with the faster backward
    above, and with `relu=True` a ReLU after it; same parameters, same state_dict, same values."""

    def __init__(self, *args, relu: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ConvTranspose2dFunction.apply(x, self.weight, self.bias, self.stride[0], self.padding[0],
                                              self.output_padding[0], self.relu)


class ResBlock(nn.Module):
    """x + Conv3x3(ReLU(Conv3x3(ReLU(x)))), the same width in and out; [B,w,H,W] -> [B,w,H,W]. The
    second convolution starts at zero, so the block starts as the identity and deep stacks train
    stably without normalisation layers (Goyal et al. 2017; improved-diffusion's zero_module)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(torch.relu(x))))


class SharedInputHead(nn.Sequential):
    """An activation, then a linear layer (nn.Linear, or an nn.Conv2d) of the concatenation [a, b]
    of two inputs along dim 1, where b is shared by draws: a [K*B, ...] holds K draws of each of B
    images, draw-major (as HierarchicalVAE.forward lays out K draws), b [B, ...] one row per image.

    The layer's weight is split by input, [W_a | W_b], and the head computes W_a act(a) +
    (W_b act(b) + bias), b's part once per image and added to each of its K draws: in an IWAE bound
    of K draws the work on the bottom-up features drops K-fold, and they are never copied per draw.
    Outputs are float32 (each part's sum in it). A Sequential (activation, layer) holding the whole
    weight, so that its parameters and state_dict are those of the Sequential it replaces, which
    ran on torch.cat([a, b], 1): saved runs and their optimiser states load as they are."""

    def __init__(self, activation: nn.Module, layer: nn.Linear | nn.Conv2d, a_features: int) -> None:
        super().__init__(activation, layer)
        self.a_features = a_features

    def split_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_a, W_b): the layer's weight split along its input features."""
        weight = self[1].weight
        return weight.split([self.a_features, weight.shape[1] - self.a_features], dim=1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        activation, layer = self
        w_a, w_b = self.split_weight()
        linear = partial(F.conv2d, stride=layer.stride, padding=layer.padding) if isinstance(layer, nn.Conv2d) else F.linear
        return add_per_image(linear(activation(a), w_a), linear(activation(b), w_b, layer.bias))


def add_per_image(per_draw: torch.Tensor, per_image: torch.Tensor) -> torch.Tensor:
    """per_draw [K*B, ...] (K draws of each of B images, draw-major) plus per_image [B, ...], each
    image's row added to its K draws: [K*B, ...] float32."""
    per_draw, per_image = full_precision(per_draw), full_precision(per_image)
    return (per_draw.unflatten(0, (-1, per_image.shape[0])) + per_image).flatten(0, 1)


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """A network output under autocast (bf16) as float32, for the densities; float32 and float64 as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


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
