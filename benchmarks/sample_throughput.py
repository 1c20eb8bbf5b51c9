"""Generation speed: images decoded from prior draws per second, under inference_mode.

    python benchmarks/sample_throughput.py --precision bf16 --batch-size 1000
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import emit, machine, peak_memory_mb

from vaekit.distributed import setup
from vaekit.generate import prior_samples
from vaekit.models import ConvVAE, ModelConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--batches", type=int, default=20, help="batches per repeat")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    rt = setup(args.device, args.precision)
    model = ConvVAE(ModelConfig()).to(rt.device).eval()   # speed does not depend on the weights
    gen = rt.generator(0)
    rates = []
    for r in range(args.repeats + 1):          # the first repeat warms up and is not counted
        start = time.perf_counter()
        with rt.autocast():
            for _ in range(args.batches):
                images = prior_samples(model, args.batch_size, gen)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        if r:
            rates.append(args.batches * args.batch_size / (time.perf_counter() - start))
    assert images.shape == (args.batch_size, 1, 28, 28)
    emit({"benchmark": "sample_throughput", "model": "conv_vae (seed)", "batch_size": args.batch_size,
          "device": rt.device.type, "precision": rt.precision, "img_per_s": round(statistics.median(rates)),
          "ms_per_batch": round(1000 * args.batch_size / statistics.median(rates), 2),
          **peak_memory_mb(rt.device), **machine()})


if __name__ == "__main__":
    main()
