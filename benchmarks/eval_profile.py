"""Where the time of an IWAE pass goes: torch.profiler over `vaekit eval`'s pass of one model.

    python benchmarks/eval_profile.py --model frontier --compile     # inductor's fused kernels named
    python benchmarks/eval_profile.py --model ladder --draws 1000

The model (`--model`, as benchmarks/peak.py builds it: weights do not change speed) is prepared
for inference as `vaekit eval` prepares it; one test image of the shipped MNIST sample is scored
with --draws importance draws a pass, the pass under torch.compile with `--compile` (as
`--compile on` runs it; inductor's kernels are then profiled one by one). Prints one JSON line
per operator or kernel among the --top by self time: milliseconds per pass and share of a pass
timed without the profiler.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import MODELS, MODELS_HELP, emit, machine
from peak import models
from torch.profiler import ProfilerActivity, profile

from vaekit.compiling import log_weights
from vaekit.data import load_splits, preprocess
from vaekit.distributed import setup
from vaekit.evaluate import LogWeights
from vaekit.models.inference import prepare_for_inference

SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "data" / "mnist-sample"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="frontier", choices=MODELS, help=f"the model (default frontier): {MODELS_HELP}")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--draws", type=int, default=1000, help="importance draws a pass (default 1000)")
    p.add_argument("--passes", type=int, default=4, help="passes profiled (default 4)")
    p.add_argument("--top", type=int, default=15, help="operators printed (default 15)")
    p.add_argument("--compile", action="store_true", help="the pass under torch.compile, its kernels profiled")
    args = p.parse_args()
    if args.compile:
        from torch._inductor import config as inductor
        inductor.cpp.enable_kernel_profile = True                   # each fused kernel a profiler event

    rt = setup("cpu", args.precision)
    model = prepare_for_inference(models()[args.model].to(memory_format=torch.channels_last).eval(), rt)
    weigh = log_weights(model, "on", rt.device, print, args.draws) if args.compile else LogWeights(model)
    x = preprocess(load_splits("mnist", SAMPLE).test.images[:1], "static")
    eps = torch.randn(args.draws, 1, model.noise_dim)
    with torch.inference_mode():
        for _ in range(2):                                          # compiles, then warms up
            weigh(x, eps, None)
        start = time.perf_counter()
        for _ in range(args.passes):
            weigh(x, eps, None)
        pass_ms = 1000 * (time.perf_counter() - start) / args.passes     # without the profiler's overhead
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.passes):
                weigh(x, eps, None)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    info = machine()
    for e in events[:args.top]:
        ms = e.self_cpu_time_total / 1000 / args.passes
        emit({"benchmark": "eval_profile", "model": args.model, "compiled": args.compile, "precision": rt.precision,
              "draws": args.draws, "op": e.key, "ms_per_pass": round(ms, 2), "pass_ms": round(pass_ms, 1),
              "share": round(ms / pass_ms, 3), **info})


if __name__ == "__main__":
    main()
