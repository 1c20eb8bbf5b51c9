"""Evaluation speed: decodes per second of the IWAE bound as `vaekit eval` computes it, beside the
matrix-multiply peaks of this machine measured in the same process.

    python benchmarks/eval_throughput.py                       # precision auto, decode batch tuned
    python benchmarks/eval_throughput.py --precision fp32 --decode-batch 2000 --training-form

The seed's model (speed does not depend on its weights) scores the shipped MNIST sample's test
images, K draws each. `--training-form` times the model as training runs it (no weights laid out
once, the one-channel output layer as it is) instead of `prepare_for_inference`'s form: the
before and after of the same evaluation. One JSON line: decodes/s, the precision, the decode
batch, the useful FLOPs of one decode (the model's, not the rewrite's), the fp32 and bf16 matmul
peaks and the fraction of each reached.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from common import emit, machine, peak_memory_mb
from torch.utils.flop_counter import FlopCounterMode

from vaekit.data import load_splits, preprocess
from vaekit.distributed import setup
from vaekit.evaluate import decode_batch_for, iwae_bounds
from vaekit.models import ConvVAE, ModelConfig
from vaekit.models.inference import prepare_for_inference

SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "data" / "mnist-sample"


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 1024, seconds: float = 1.0) -> float:
    """FLOP/s of an n x n matrix product in `dtype`, the best of repeats lasting `seconds` in all."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best, spent = 0.0, 0.0
    while spent < seconds:
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        best, spent = max(best, 2 * n ** 3 / elapsed), spent + elapsed
    return best


def flops_per_decode(model) -> float:
    """The FLOPs of one decode, counted in float64, where every layer runs torch's own operators
    (oneDNN's fused kernels, which the counter does not see, take float32 and bf16 only)."""
    reference = copy.deepcopy(model).double()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        reference.decode(torch.zeros(1, model.latent_dim, dtype=torch.float64))
    return counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--k", type=int, default=500, help="draws per image (default 500)")
    p.add_argument("--images", type=int, default=40, help="test images per repeat (default 40)")
    p.add_argument("--decode-batch", type=int, help="decodes at once (default: tuned, as vaekit eval does)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--training-form", action="store_true", help="time the model as training runs it")
    args = p.parse_args()

    rt = setup(args.device, args.precision)
    model = ConvVAE(ModelConfig()).to(rt.device, memory_format=torch.channels_last).eval()
    flops = flops_per_decode(model)
    if args.training_form:
        evaluated, context = model, rt.autocast
    else:
        evaluated, context = prepare_for_inference(model, rt), torch.inference_mode
    x = preprocess(load_splits("mnist", SAMPLE).test.images[:args.images].to(rt.device), "static")
    decode_batch = args.decode_batch or decode_batch_for(evaluated, rt.device, 10 ** 9)
    rates = []
    for r in range(args.repeats + 1):            # the first repeat warms up and is not counted
        start = time.perf_counter()
        with context():
            iwae_bounds(evaluated, x, args.k, seed=r, decode_batch=decode_batch)
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        if r:
            rates.append(len(x) * args.k / (time.perf_counter() - start))
    rate = statistics.median(rates)
    peaks = {name: matmul_peak(dtype, rt.device) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    emit({"benchmark": "eval_throughput", "model": "conv_vae (seed)", "form": "training" if args.training_form
          else "inference", "device": rt.device.type, "precision": rt.precision, "decode_batch": decode_batch,
          "k": args.k, "decodes_per_s": round(rate), "mflop_per_decode": round(flops / 1e6, 2),
          "gflops": round(rate * flops / 1e9, 1), "fp32_peak_gflops": round(peaks["fp32"] / 1e9, 1),
          "bf16_peak_gflops": round(peaks["bf16"] / 1e9, 1),
          "fraction_of_fp32_peak": round(rate * flops / peaks["fp32"], 3),
          "fraction_of_bf16_peak": round(rate * flops / peaks["bf16"], 3),
          "k5000_test_set_minutes": round(10_000 * 5000 / rate / 60, 1), **peak_memory_mb(rt.device), **machine()})


if __name__ == "__main__":
    main()
