"""Where a CPU training step's time goes: batch, forward, loss, backward, optimizer, on real MNIST.

    python benchmarks/step_phases.py --batch-size 1      # the fixed cost of a step
    python benchmarks/step_phases.py --batch-size 100    # the seed's step

The step is `vaekit.train.train_step`'s, written out (static binarization, bf16 autocast by
default, fused Adam) and cut into its phases with a clock between them; prints one JSON line: the
median ms of each phase over --steps steps after a warm-up. At batch 1 the arithmetic is
negligible, so what remains is the per-step cost of Python, the dispatcher, autograd and oneDNN's
per-call setup.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import emit, machine

import vaekit
from vaekit.data import preprocess, splits_for
from vaekit.distributed import setup
from vaekit.models import build_model
from vaekit.objectives import training_loss

PHASES = ("batch", "forward", "loss", "backward", "optimizer")
WARMUP_STEPS = 50   # untimed: oneDNN builds its kernels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()

    config = vaekit.Config()
    rt = setup("cpu", args.precision)
    images = splits_for(config.data, log=lambda *_: None).train.images
    torch.manual_seed(0)
    model = build_model(config.model).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr, fused=True)
    noise = rt.generator(1)
    seconds = {phase: [] for phase in PHASES}
    for step in range(WARMUP_STEPS + args.steps):
        clock = [time.perf_counter()]
        idx = torch.randint(len(images), (args.batch_size,))
        x = preprocess(images[idx], "static", noise)
        eps = torch.randn(args.batch_size, config.model.latent_dim, generator=noise)
        clock.append(time.perf_counter())
        with rt.autocast():
            terms = model(x, eps=eps)
        clock.append(time.perf_counter())
        loss = training_loss(terms).mean()
        clock.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clock.append(time.perf_counter())
        optimizer.step()
        clock.append(time.perf_counter())
        if step >= WARMUP_STEPS:
            for phase, start, end in zip(PHASES, clock, clock[1:]):
                seconds[phase].append(end - start)
    ms = {f"{phase}_ms": round(1000 * statistics.median(s), 3) for phase, s in seconds.items()}
    emit({"benchmark": "step_phases", "batch_size": args.batch_size, "precision": rt.precision, **ms,
          "step_ms": round(sum(ms.values()), 2), **machine()})


if __name__ == "__main__":
    main()
