"""A trained model made ready for many decodes (evaluation, sampling, the demo), computing what
it computes in training.

`prepare_for_inference(model, runtime)` returns a frozen copy in which
- every convolution's weights (in every network of the model) are laid out once for the backend (on CPU, oneDNN's blocked
  layout, which it would otherwise build again on every call) in the precision of the run, a
  hierarchy's posterior heads in their two parts (layers.SharedInputHead);
- a stride-1 output layer with few channels (the seed's ConvTranspose 32 -> 1) becomes the same
  function computed without waste: oneDNN pads the output channels of a convolution to its
  vector block (8 floats with AVX2, 16 with AVX-512), so one output channel costs as much as 16.
  The layer is rewritten as a stride-s convolution with out * s * s channels, each computing one
  of the s x s positions of an output block, then a pixel shuffle (see `subpixel_conv`);
- every network of the model (encoder, decoder, and a hierarchy's bottom-up and top-down blocks)
  runs in the runtime's precision by itself, under autocast to bf16 where it was asked for and in
  fp32 otherwise, whatever autocast its caller holds, and hands back float32, so likelihoods and
  objectives never see bf16. The copy records it in `inference_precision`: the precision is the
  model's, and no caller wraps a prepared model in autocast (see evaluate.py).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvTranspose2d, SharedInputHead, add_per_image, onednn_runs

VECTOR_BLOCK = 16       # output channels the subpixel form aims to fill: oneDNN's AVX-512 block (AVX2's is 8)
SUBPIXEL_STRIDES = (4, 2)


def conv_transpose_as_conv(weight: torch.Tensor, padding: int) -> tuple[torch.Tensor, int]:
    """A stride-1 transposed convolution as an ordinary one: weight [in, out, k, k] with padding p
    -> (weight [out, in, k, k] flipped in space, padding k - 1 - p), the same function exactly."""
    k = weight.shape[-1]
    return weight.flip(2, 3).transpose(0, 1), k - 1 - padding


def subpixel_conv(weight: torch.Tensor, bias: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stride-1 convolution (weight [out, in, k, k], padding p) as a stride-s convolution with
    kernel k + s - 1, the same padding p, and out * s * s channels followed by `F.pixel_shuffle(., s)`.

    Output pixel (s*Y + a, s*X + b) of the original reads input rows s*Y + a - p + i, i < k; the
    channel (c, a, b) of the new convolution reads rows s*Y - p + t, t < k + s - 1, so its kernel
    is the original one placed at offset (a, b) in a zero (k + s - 1)^2 window. Same sums, in
    the same order: the result equals the original's (tested in float64). Returns (weight, bias)."""
    out_ch, in_ch, k, _ = weight.shape
    window = k + stride - 1
    sub = weight.new_zeros(out_ch, stride, stride, in_ch, window, window)
    for a in range(stride):
        for b in range(stride):
            sub[:, a, b, :, a:a + k, b:b + k] = weight
    return sub.flatten(0, 2), bias.repeat_interleave(stride * stride)


class PackedConv(nn.Module):
    """A convolution (or transposed convolution) with its weights prepared once, optionally
    followed by a ReLU and a pixel shuffle. Inputs are cast to `dtype`; outputs stay in it.

    On CPU (oneDNN) the weights are reordered into the kernel's blocked layout here, once; on
    other devices they are only cast, as cuDNN keeps no such layout. Under torch.compile the
    layer runs as plain aten operators on the unpacked weights (`plain_weight`): the fake
    kernels of oneDNN's ops disagree with the real ones on output strides (a one-channel input,
    a transposed weight not yet packed), and inductor lays out and fuses plain convolutions itself."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int,
                 output_padding: int = 0, transposed: bool = False, relu: bool = False, shuffle: int = 1,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.geometry = dict(stride=stride, padding=padding, output_padding=output_padding)
        self.transposed, self.relu, self.shuffle, self.dtype = transposed, relu, shuffle, dtype
        weight = weight.detach().to(dtype).contiguous(memory_format=torch.channels_last)
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.plain_weight = weight                     # [out, in, k, k] (transposed: [in, out, k, k])
        self.onednn = onednn_runs(weight)
        if self.onednn:
            pads, strides, ones = [padding] * 2, [stride] * 2, [1, 1]
            if transposed:
                weight = torch.ops.mkldnn._reorder_convolution_transpose_weight(
                    weight, pads, [output_padding] * 2, strides, ones, 1, None)
            else:
                weight = torch.ops.mkldnn._reorder_convolution_weight(weight, pads, strides, ones, 1, None)
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        s, p, op = self.geometry["stride"], self.geometry["padding"], self.geometry["output_padding"]
        if self.onednn and not torch.compiler.is_compiling():
            post = "relu" if self.relu else "none"
            if self.transposed:
                y = torch.ops.mkldnn._convolution_transpose_pointwise(
                    x, self.weight, self.bias, [p] * 2, [op] * 2, [s] * 2, [1, 1], 1, post, [None], "")
            else:
                y = torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, [p] * 2, [s] * 2, [1, 1], 1,
                                                            post, [None], "")
        else:
            y = (F.conv_transpose2d(x, self.plain_weight, self.bias, s, p, op) if self.transposed
                 else F.conv2d(x, self.plain_weight, self.bias, s, p))
            y = torch.relu(y) if self.relu else y
        return F.pixel_shuffle(y, self.shuffle) if self.shuffle > 1 else y


def _square(value) -> int:
    """The single value of a square kernel's stride or padding (an int or an equal pair)."""
    if isinstance(value, str) or len(set(value)) != 1:
        raise ValueError(f"prepare_for_inference handles square, numeric geometry; got {value!r}")
    return value[0]


def _subpixel_stride(out_channels: int, out_size: int) -> int:
    """The stride s that fills VECTOR_BLOCK output channels best (out * s * s <= the block), s
    dividing the output's side; 1 when no rewrite pays (out_channels already fill a block)."""
    return next((s for s in SUBPIXEL_STRIDES if out_channels * s * s <= VECTOR_BLOCK and out_size % s == 0), 1)


def pack(module: nn.Module, dtype: torch.dtype, out_size: int | None = None) -> PackedConv:
    """The PackedConv computing what `module` (nn.Conv2d, nn.ConvTranspose2d or vaekit's fused
    ConvTranspose2d) computes. With `out_size` (the output's side), a stride-1 layer with few
    output channels is rewritten in subpixel form."""
    stride, padding = _square(module.stride), _square(module.padding)
    transposed = isinstance(module, nn.ConvTranspose2d)
    relu = isinstance(module, ConvTranspose2d) and module.relu
    weight, bias = module.weight, module.bias
    s = _subpixel_stride(module.out_channels, out_size) if out_size and stride == 1 and not relu else 1
    if s == 1:
        output_padding = _square(module.output_padding) if transposed else 0
        return PackedConv(weight, bias, stride, padding, output_padding, transposed, relu, dtype=dtype)
    if transposed:
        weight, padding = conv_transpose_as_conv(weight, padding)
    weight, bias = subpixel_conv(weight, bias, s)
    return PackedConv(weight, bias, s, padding, shuffle=s, dtype=dtype)


class PackedSharedInputHead(nn.Module):
    """A SharedInputHead (layers.py) of a convolution with each part's weights packed: the part on
    a without the bias, the one on b (once per image) with it."""

    def __init__(self, head: SharedInputHead, dtype: torch.dtype) -> None:
        super().__init__()
        self.activation, conv = head
        stride, padding = _square(conv.stride), _square(conv.padding)
        w_a, w_b = head.split_weight()
        self.a_part = PackedConv(w_a, None, stride, padding, dtype=dtype)
        self.b_part = PackedConv(w_b, conv.bias, stride, padding, dtype=dtype)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return add_per_image(self.a_part(self.activation(a)), self.b_part(self.activation(b)))


class Precision(nn.Module):
    """Runs `module` under autocast to `dtype` (None: fp32, any autocast around it switched off)
    and hands back float32: one network of a prepared model in the model's precision."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.module(*inputs).float()


def _in_precision(model: nn.Module, device_type: str, dtype: torch.dtype | None) -> None:
    """Every network of `model` (each child module holding parameters, each member of a
    ModuleList) wrapped in Precision, in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.ModuleList):
            for i, member in enumerate(child):
                child[i] = Precision(member, device_type, dtype)
        elif next(child.parameters(), None) is not None:
            setattr(model, name, Precision(child, device_type, dtype))


def _replace(model: nn.Module, replacement) -> None:
    """Each module m of `model` for which replacement(m) is not None replaced by it, in place."""
    for name, module in list(model.named_modules()):
        if (new := replacement(module)) is not None:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def _replace_convs(model: nn.Module, dtype: torch.dtype, last: nn.Module, out_size: int) -> None:
    """Every convolution of `model` (encoder, decoder, a hierarchy's top-down blocks) packed in
    place: a SharedInputHead's in its two parts; `last`, the decoder's output layer, in subpixel
    form when it is a stride-1 convolution (its output's side is the image's, `out_size`)."""
    _replace(model, lambda m: PackedSharedInputHead(m, dtype)
             if isinstance(m, SharedInputHead) and isinstance(m[1], nn.Conv2d) else None)
    _replace(model, lambda m: pack(m, dtype, out_size if m is last else None)
             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) else None)


@torch.no_grad()
def prepare_for_inference(model, runtime) -> nn.Module:
    """A frozen copy of `model` for decoding on `runtime.device` in `runtime.precision`, which it
    carries (see the module docstring). The original is left as it was (training can go on with it)."""
    model = copy.deepcopy(model).to(runtime.device).eval().requires_grad_(False)
    dtype = runtime.autocast_dtype or torch.float32
    _replace_convs(model, dtype, last=model.decoder[-1], out_size=model.config.image_size)
    _in_precision(model, runtime.device.type, runtime.autocast_dtype)
    model.inference_precision = runtime.precision
    model.freeze_prior()
    return model
