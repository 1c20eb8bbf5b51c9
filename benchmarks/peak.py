"""The machine's matrix-multiply peak, measured honestly, and the matrix products the models' layers are.

    python benchmarks/peak.py                       # square products 1024..4096, bf16 and fp32, then the layers' shapes
    python benchmarks/peak.py --batch 512 --no-layers

"The peak" is the best FLOP/s of square products n x n x n for n in SQUARE_SIZES (up to 4096),
each the best of repeats lasting `seconds`: a 1024 product does not fill AMX or AVX512-BF16
units (on a Sapphire Rapids machine it gave 487 against 1,692 GFLOP/s at 4096), so a fraction
of a small product's speed overstates how close a model comes. Every benchmark that prints a
fraction of peak imports `peaks()` and measures it in its own process, minutes apart figures
of a shared machine being different things.

The layers' shapes (`conv_gemms`): a convolution computed as im2col and one product is
[M, K] @ [K, N] with M = B * H_out * W_out, K = C_in * k * k, N = C_out; a stride-s transposed
convolution is s * s products, one per output phase, M = B * H_in * W_in, K = C_in * (the taps
reaching that phase), N = C_out; a linear layer M = B, K = in, N = out. Their FLOPs (2 M N K)
add up to the layer's useful FLOPs; timing plain matmuls of those shapes says how fast the
machine's GEMM runs the layer's arithmetic, apart from the convolution kernel and its memory traffic.
"""
from __future__ import annotations

import argparse
import time

import torch
from common import RECIPES, emit, machine, recipe

SQUARE_SIZES = (1024, 2048, 3072, 4096)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(pairs, device: torch.device, seconds: float) -> float:
    """The best time of computing every product of `pairs` ([(a, b)]) once, over repeats lasting
    `seconds` in all (at least two, after one that warms up: oneDNN builds its kernels)."""
    for a, b in pairs:
        a @ b
    _sync(device)
    best, spent, runs = float("inf"), 0.0, 0
    while spent < seconds or runs < 2:
        start = time.perf_counter()
        for a, b in pairs:
            a @ b
        _sync(device)
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return best


def gemms_rate(gemms: list[tuple[int, int, int]], dtype: torch.dtype, device: torch.device, seconds: float = 0.5) -> float:
    """FLOP/s of the products [m,k] @ [k,n] of `gemms` ([(m, k, n)]) run one after the other in `dtype`."""
    pairs = [(torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)) for m, k, n in gemms]
    return sum(2 * m * k * n for m, k, n in gemms) / _best_seconds(pairs, device, seconds)


def square_rates(dtype: torch.dtype, device: torch.device, sizes=SQUARE_SIZES, seconds: float = 0.5) -> dict[int, float]:
    """FLOP/s of each n x n x n product of `sizes`."""
    return {n: gemms_rate([(n, n, n)], dtype, device, seconds) for n in sizes}


def peaks(device: torch.device, seconds: float = 0.5) -> dict[str, float]:
    """The peak FLOP/s per precision ('fp32', 'bf16'): the best square product of SQUARE_SIZES.
    On a CPU without bf16 instructions the bf16 figure is torch's emulation (slow, and honest)."""
    return {name: max(square_rates(dtype, device, seconds=seconds).values()) for name, dtype in DTYPES.items()}


def _phase_taps(k: int, s: int) -> list[int]:
    """The kernel taps of a k-wide, stride-s transposed convolution that reach each of the s output
    phases along one axis (k=3, s=2: [2, 1]); they add up to k."""
    return [len(range(phase, k, s)) for phase in range(s)]


def conv_gemms(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[tuple[int, int, int]]:
    """The matrix products [(m, k, n)] of `module` (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
    on input x and output y, adding up to its useful FLOPs (see the module docstring):
    a linear layer is one; a convolution one im2col product; a transposed convolution one
    product per output phase (stride s: s*s of them, the sub-pixel form, each over the input's
    pixels with the taps that reach that phase), which is how a direct kernel gathers its output."""
    if isinstance(module, torch.nn.Linear):
        return [(x.numel() // x.shape[-1], module.in_features, module.out_features)]
    c_in, c_out = module.in_channels, module.out_channels
    k, s = module.kernel_size[0], module.stride[0]
    if isinstance(module, torch.nn.ConvTranspose2d):
        pixels = x.shape[0] * x.shape[2] * x.shape[3]
        taps = _phase_taps(k, s)
        return [(pixels, c_in * ty * tx, c_out) for ty in taps for tx in taps]
    return [(y.shape[0] * y.shape[2] * y.shape[3], c_in * k * k, c_out)]


def layer_gemms(model: torch.nn.Module, z: torch.Tensor, call=None) -> list[dict]:
    """The matrix products of every convolution and linear layer that `call(model, z)` (default:
    model.decode(z)) runs, in order: [{'layer', 'kind', 'gemms': [(m, k, n)], 'flops'}]."""
    rows, hooks = [], []

    def record(name):
        def hook(module, inputs, output):
            gemms = conv_gemms(module, inputs[0], output)
            rows.append({"layer": name, "kind": type(module).__name__, "gemms": gemms,
                         "flops": sum(2 * m * k * n for m, k, n in gemms)})
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            hooks.append(module.register_forward_hook(record(name)))
    try:
        with torch.inference_mode():
            (call or (lambda mdl, code: mdl.decode(code)))(model, z)
    finally:
        for h in hooks:
            h.remove()
    return rows


def models() -> dict:
    """The seed's model and those of configs/mnist-ladder.json and configs/mnist-frontier.json
    (common.recipe; weights do not change speed), by name."""
    from vaekit.models import ModelConfig, build_model

    return {"seed": build_model(ModelConfig()),
            **{name: build_model(ModelConfig(**recipe(name)["model"])) for name in RECIPES}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seconds", type=float, default=0.5, help="time spent per shape and precision (default 0.5)")
    p.add_argument("--batch", type=int, default=512, help="decodes at once for the layers' shapes (default 512)")
    p.add_argument("--no-layers", action="store_true", help="square products only")
    args = p.parse_args()
    device = torch.device(args.device)
    info = machine()
    best = {}
    for name, dtype in DTYPES.items():
        rates = square_rates(dtype, device, seconds=args.seconds)
        best[name] = max(rates.values())
        for n, rate in rates.items():
            emit({"benchmark": "peak", "shape": f"{n}x{n}x{n}", "precision": name, "gflops": round(rate / 1e9, 1)})
        emit({"benchmark": "peak", "precision": name, "peak_gflops": round(best[name] / 1e9, 1),
              "best_of": list(SQUARE_SIZES), **info})
    if args.no_layers:
        return
    for model_name, model in models().items():
        z = torch.randn(args.batch, model.latent_dim)
        for row in layer_gemms(model, z):
            for name, dtype in DTYPES.items():
                rate = gemms_rate(row["gemms"], dtype, device, args.seconds / 2)
                emit({"benchmark": "peak_layer_gemm", "model": model_name, **row, "precision": name,
                      "gflops": round(rate / 1e9, 1), "fraction_of_peak": round(rate / best[name], 3)})


if __name__ == "__main__":
    main()
