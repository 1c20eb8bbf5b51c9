"""Evaluation speed: decodes per second of the IWAE bound as `vaekit eval` computes it, beside the
matrix-multiply peaks of this machine measured in the same process.

    python benchmarks/eval_throughput.py                       # precision auto, decode batch tuned
    python benchmarks/eval_throughput.py --precision fp32 --decode-batch 2000 --training-form
    python benchmarks/eval_throughput.py --compile            # the IWAE pass under torch.compile
    python benchmarks/eval_throughput.py --model frontier --compile
    python benchmarks/eval_throughput.py --workers 2          # the pass in 2 processes (vaekit eval --workers)

The seed's model, `--model ladder` (configs/mnist-ladder.json: ladder, VampPrior;
pretrained:mnist-best's until it was replaced by the spatial frontier model) or `--model frontier`
(configs/mnist-frontier.json, pretrained:mnist-best's architecture now; speed does not depend on
the weights) scores the shipped MNIST sample's test
images, K draws each. `--training-form` times the model as training runs it (no weights laid out
once, the one-channel output layer as it is) instead of `prepare_for_inference`'s form: the
before and after of the same evaluation. One JSON line: decodes/s, the precision, the decode
batch, the useful FLOPs of one draw (the model's, not the rewrite's), the fp32 and bf16 matmul
peaks (benchmarks/peak.py: the best square product up to 4096, measured in this process after
the decodes) and the fraction of each reached.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import statistics
import time
from pathlib import Path

import torch
from common import MODELS, MODELS_HELP, emit, machine, peak_memory_mb
from peak import models, peaks
from torch.utils.flop_counter import FlopCounterMode

from vaekit.compiling import for_inference, log_weights
from vaekit.data import load_splits, preprocess
from vaekit.distributed import setup
from vaekit.eval_workers import EvalWorkers, check_workers, threads, threads_per_worker
from vaekit.evaluate import decode_batch_for, iwae_bounds
from vaekit.models.inference import prepare_for_inference

SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "data" / "mnist-sample"


def flops_per_draw(model, image: torch.Tensor) -> float:
    """The FLOPs one more importance draw of `image` [1,C,H,W] costs in the IWAE pass (the model's
    forward with K=2 draws less with K=1: the decode and whatever else runs per draw, as the
    ladder's top-down posterior path; not the encoder, which runs once per image). Counted in
    float64, where every layer runs torch's own operators (oneDNN's fused kernels, which the
    counter does not see, take float32 and bf16 only)."""
    reference = copy.deepcopy(model).cpu().double()
    image = image.cpu().double()
    counts = []
    for k in (1, 2):
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            reference(image, eps=torch.zeros(k, 1, model.noise_dim, dtype=torch.float64))
        counts.append(counter.get_total_flops())
    return counts[1] - counts[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--k", type=int, default=500, help="draws per image (default 500)")
    p.add_argument("--images", type=int, default=40, help="test images per repeat (default 40)")
    p.add_argument("--decode-batch", type=int, help="decodes at once (default: tuned, as vaekit eval does)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="seed", choices=MODELS, help=f"the model: {MODELS_HELP}")
    p.add_argument("--training-form", action="store_true", help="time the model as training runs it")
    p.add_argument("--compile", action="store_true",
                   help="the IWAE pass under torch.compile, as `vaekit eval --compile on` runs it (the "
                        "warm-up repeat compiles)")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the IWAE pass, each with its share "
                   "of the threads, as `vaekit eval --workers N` runs it (default 1)")
    args = p.parse_args()
    if args.workers > 1 and args.training_form:
        p.error("--workers runs the inference form: leave out --training-form")

    rt = setup(args.device, args.precision)
    model = models()[args.model].to(rt.device, memory_format=torch.channels_last).eval()
    setting = "on" if args.compile else "off"
    if args.training_form:
        evaluated, context = model, rt.autocast
    else:
        evaluated = for_inference(prepare_for_inference(model, rt), setting, rt.device)
        context = torch.inference_mode
    weigh = log_weights(evaluated, setting, rt.device, print, args.images * args.k)
    x = preprocess(load_splits("mnist", SAMPLE).test.images[:args.images].to(rt.device), "static")
    flops = flops_per_draw(model, x[:1])
    check_workers(args.workers, rt.device)
    with threads(threads_per_worker(args.workers)):
        decode_batch = args.decode_batch or decode_batch_for(evaluated, rt.device, 10 ** 9)
    rates = []
    with contextlib.ExitStack() as stack:
        score = functools.partial(iwae_bounds, evaluated, log_weights=weigh)
        if args.workers > 1:
            score = stack.enter_context(EvalWorkers(args.workers, model.config, model.state_dict(), rt.device,
                                                    rt.precision, setting, args.images * args.k, print)).iwae_bounds
        for r in range(args.repeats + 1):            # the first repeat warms up (and starts workers): not counted
            start = time.perf_counter()
            with context():
                score(x, args.k, seed=r, decode_batch=decode_batch)
            if rt.device.type == "cuda":
                torch.cuda.synchronize(rt.device)
            if r:
                rates.append(len(x) * args.k / (time.perf_counter() - start))
    rate = statistics.median(rates)
    peak = peaks(rt.device)                      # the best square product up to 4096, this process
    emit({"benchmark": "eval_throughput", "model": args.model, "form": "training" if args.training_form
          else "inference", "compiled": args.compile, "workers": args.workers, "device": rt.device.type, "precision": rt.precision, "decode_batch": decode_batch,
          "k": args.k, "decodes_per_s": round(rate), "mflop_per_draw": round(flops / 1e6, 2),
          "gflops": round(rate * flops / 1e9, 1), "fp32_peak_gflops": round(peak["fp32"] / 1e9, 1),
          "bf16_peak_gflops": round(peak["bf16"] / 1e9, 1),
          "fraction_of_fp32_peak": round(rate * flops / peak["fp32"], 3),
          "fraction_of_bf16_peak": round(rate * flops / peak["bf16"], 3),
          "k5000_test_set_minutes": round(10_000 * 5000 / rate / 60, 1), **peak_memory_mb(rt.device), **machine()})


if __name__ == "__main__":
    main()
