"""The transposed-convolution backward: autograd's (oneDNN deconvolution kernels) against
vaekit's (ordinary convolution kernels), for the seed decoder's layers, bf16, channels_last.

    python benchmarks/convt_backward.py
"""
from __future__ import annotations

import statistics
import time

import torch
from common import emit, machine

from vaekit.models.layers import ConvTranspose2d

LAYERS = [  # (in, out, input size, stride, padding, output_padding): the seed's decoder
    (32, 64, 7, 2, 1, 1), (64, 32, 14, 2, 1, 1), (32, 1, 28, 1, 1, 0)]


def median_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    for cin, cout, size, stride, pad, out_pad in LAYERS:
        x = torch.randn(100, cin, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
        timings = {}
        for name, cls in (("autograd", torch.nn.ConvTranspose2d), ("vaekit", ConvTranspose2d)):
            torch.manual_seed(1)
            layer = cls(cin, cout, 3, stride, pad, out_pad).to(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(x)
            grad = torch.randn_like(y)
            timings[name] = median_ms(lambda: torch.autograd.grad(y, (x, layer.weight, layer.bias), grad,
                                                                  retain_graph=True))
        emit({"benchmark": "convt_backward", "layer": f"ConvT {cin}->{cout}, {size}x{size}, stride {stride}",
              "batch": 100, "precision": "bf16", "autograd_ms": round(timings["autograd"], 3),
              "vaekit_ms": round(timings["vaekit"], 3),
              "speedup": round(timings["autograd"] / timings["vaekit"], 2), **machine()})


if __name__ == "__main__":
    main()
