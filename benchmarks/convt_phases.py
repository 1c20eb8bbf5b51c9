"""The seed decoder's 64 -> 32 transposed convolution (3x3, stride 2: 75% of a decode's FLOPs) as
`vaekit eval` runs it (oneDNN's deconvolution kernel, ReLU fused) against two rewrites as
ordinary stride-1 convolutions, bf16, channels_last, in one process, A B C A B C:

- `phases`: one convolution per output phase (even/odd row, even/odd column: kernels of 1x1,
  1x2, 2x1 and 2x2 taps, the 9 taps exactly), each phase written into its place of the output;
- `one_conv`: one 2x2 convolution with 4 x 32 outputs (the 9 taps padded to 16: 1.8x the FLOPs),
  then a pixel shuffle.

    python benchmarks/convt_phases.py --decodes 1000 --rounds 4

Prints one JSON line per form: the median milliseconds over the rounds and the largest
difference from the transposed kernel's output (bf16 rounding).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import emit, machine

from vaekit.models.inference import PackedConv

C_IN, C_OUT, SIZE = 64, 32, 14          # the seed decoder's decoder.4: [N,64,14,14] -> [N,32,28,28]


def phase_taps(phase: int) -> list[tuple[int, int]]:
    """(input offset, kernel index) of the taps reaching output rows of `phase` (0: even, 1: odd)
    for kernel 3, stride 2, padding 1: row 2m reads input m with tap 1; row 2m+1 reads m with
    tap 2 and m+1 with tap 0."""
    return [(0, 1)] if phase == 0 else [(0, 2), (1, 0)]


def phase_weight(weight: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """The ordinary convolution weight [out, in, rows, cols] of output phase (a, b) of the
    transposed weight [in, out, 3, 3]."""
    rows, cols = phase_taps(a), phase_taps(b)
    w = weight.new_zeros(weight.shape[1], weight.shape[0], len(rows), len(cols))
    for oi, ki in rows:
        for oj, kj in cols:
            w[:, :, oi, oj] = weight[:, :, ki, kj].T
    return w


def forms(weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> dict:
    deconv = PackedConv(weight, bias, 2, 1, 1, transposed=True, relu=True, dtype=dtype)
    phases = {(a, b): PackedConv(phase_weight(weight, a, b), bias, 1, 0, relu=True, dtype=dtype)
              for a in (0, 1) for b in (0, 1)}

    def by_phase(x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (0, 1, 0, 1)).contiguous(memory_format=torch.channels_last)   # rows m and m+1
        out = x.new_empty(len(x), SIZE, 2, SIZE, 2, C_OUT)     # [N, m, a, n, b, c]: channels_last [N,c,2m+a,2n+b]
        for (a, b), conv in phases.items():
            rows, cols = conv.plain_weight.shape[2:]
            out[:, :, a, :, b, :] = conv(padded[:, :, :SIZE + rows - 1, :SIZE + cols - 1]).permute(0, 2, 3, 1)
        return out.view(len(x), 2 * SIZE, 2 * SIZE, C_OUT).permute(0, 3, 1, 2)

    padded_weight = weight.new_zeros(C_OUT, 2, 2, C_IN, 2, 2)
    for a in (0, 1):
        for b in (0, 1):
            w = phase_weight(weight, a, b)
            padded_weight[:, a, b, :, :w.shape[2], :w.shape[3]] = w
    one = PackedConv(padded_weight.flatten(0, 2), bias.repeat_interleave(4), 1, 0, relu=True, shuffle=2, dtype=dtype)
    return {"transposed": deconv, "phases": by_phase, "one_conv": lambda x: one(F.pad(x, (0, 1, 0, 1)))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decodes", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10, help="calls per form per round")
    args = p.parse_args()
    torch.manual_seed(0)
    weight, bias = torch.randn(C_IN, C_OUT, 3, 3) * 0.05, torch.randn(C_OUT) * 0.1
    x = torch.randn(args.decodes, C_IN, SIZE, SIZE).bfloat16().contiguous(memory_format=torch.channels_last)
    candidates = forms(weight, bias, torch.bfloat16)
    with torch.inference_mode():
        reference = candidates["transposed"](x).float()
        error = {name: (f(x).float() - reference).abs().max().item() for name, f in candidates.items()}
        times = {name: [] for name in candidates}
        for _ in range(args.rounds):
            for name, f in candidates.items():
                start = time.perf_counter()
                for _ in range(args.repeats):
                    f(x)
                times[name].append(1000 * (time.perf_counter() - start) / args.repeats)
    for name in candidates:
        emit({"benchmark": "convt_phases", "form": name, "decodes": args.decodes, "precision": "bf16",
              "ms_median": round(statistics.median(times[name]), 2), "max_abs_difference": error[name], **machine()})


if __name__ == "__main__":
    main()
