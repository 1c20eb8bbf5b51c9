"""Where a decode's time goes, layer by layer: FLOPs, milliseconds and the fraction of the matmul peak.

    python benchmarks/layer_table.py                         # seed and frontier, bf16 and fp32, batch 512
    python benchmarks/layer_table.py --models seed frontier --precisions bf16 --batch 1000

Each model (the seed's, configs/mnist-ladder.json's: ladder, VampPrior, pretrained:mnist-best's
until it was replaced by the spatial frontier model, or configs/mnist-frontier.json's: spatial,
pretrained:mnist-best's architecture now) is prepared
for inference as `vaekit eval` runs it (models/inference.py), and `decode` runs on --batch codes.
Every leaf module the decode calls is then timed alone on the input it received, in the
autocast state it ran under (the best of repeats lasting --seconds), and beside it its useful
FLOPs (benchmarks/peak.py's matrix products of the model's own layer: the subpixel output layer's
extra work is not counted) and the fraction of the peak (the best square matmul up to 4096 in
that precision, measured in this process). The whole decode is timed too: the layers' sum
falls short of it by what runs between them (reshapes, casts). The peak, the layers and the
decode are measured in --rounds interleaved rounds, each keeping its best: on a shared machine
the minutes of a figure and of the peak it is divided by should be the same ones. Prints a Markdown table per model
and precision, then one JSON line per row.
"""
from __future__ import annotations

import argparse
import time

import torch
from common import MODELS, MODELS_HELP, emit, machine
from peak import DTYPES, conv_gemms, models, square_rates

from vaekit.distributed import setup
from vaekit.models.inference import prepare_for_inference


def _best_ms(fn, seconds: float) -> float:
    """The best milliseconds of fn() over repeats lasting `seconds` (at least three, after a warm-up)."""
    fn()
    best, spent, runs = float("inf"), 0.0, 0
    while spent < seconds or runs < 3:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return 1000 * best


def _leaves(module: torch.nn.Module):
    """The modules without children, with their names (the wrapper `Precision`'s `module` left out of
    them: `merges.0.module` is the model's `merges.0`)."""
    for name, m in module.named_modules():
        if not list(m.children()):
            yield ".".join(part for part in name.split(".") if part != "module"), m


def useful_flops(model, z: torch.Tensor) -> dict[str, int]:
    """The useful FLOPs of each convolution and linear layer of model.decode(z), by module name."""
    flops, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            hooks.append(m.register_forward_hook(
                lambda mod, i, o, name=name: flops.__setitem__(name, sum(2 * a * b * c for a, b, c in conv_gemms(mod, i[0], o)))))
    with torch.inference_mode():
        model.decode(z)
    for h in hooks:
        h.remove()
    return flops


def layer_calls(prepared, z: torch.Tensor) -> list[tuple]:
    """Each leaf module that prepared.decode(z) calls, in call order, with what it ran on:
    [(name, module, input, autocast on, autocast dtype, output dtype)] (a module called twice is twice)."""
    calls, hooks = [], []
    for name, m in _leaves(prepared):
        hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: calls.append(
            (name, mod, i[0].clone(), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), o.dtype))))
    with torch.inference_mode():
        prepared.decode(z)
    for h in hooks:
        h.remove()
    return calls


def time_calls(calls: list[tuple], seconds: float) -> list[float]:
    """The best milliseconds of each call of `calls` run alone, in the autocast state it ran under."""
    times = []
    for _, mod, x, autocast, dtype, _ in calls:
        def run(mod=mod, x=x, autocast=autocast, dtype=dtype):
            with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=autocast):
                mod(x)
        times.append(_best_ms(run, seconds))
    return times


def markdown(rows: list[dict], total_ms: float, peak: float) -> str:
    lines = ["| layer | kind | out dtype | MFLOP | ms | GFLOP/s | fraction of peak |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = r["flops"] / r["ms"] / 1e6 if r["flops"] else None
        lines.append(f"| {r['layer']} | {r['kind']} | {r['out_dtype']} | {r['flops'] / 1e6:.0f} | {r['ms']:.2f} | "
                     + (f"{rate:.0f} | {rate * 1e9 / peak:.2f} |" if rate else "| |"))
    flops = sum(r["flops"] for r in rows)
    layers_ms = sum(r["ms"] for r in rows)
    lines.append(f"| **layers' sum** | | | {flops / 1e6:.0f} | {layers_ms:.2f} | {flops / layers_ms / 1e6:.0f} | "
                 f"{flops / layers_ms / 1e6 * 1e9 / peak:.2f} |")
    lines.append(f"| **whole decode** | | | {flops / 1e6:.0f} | {total_ms:.2f} | {flops / total_ms / 1e6:.0f} | "
                 f"{flops / total_ms / 1e6 * 1e9 / peak:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["seed", "frontier"], choices=MODELS,
                   help=f"the models (default seed frontier: the seed's and the best): {MODELS_HELP}")
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=512, help="codes decoded at once (default 512, "
                   "the decode batch `vaekit eval` tunes to on 2 AVX512-BF16 cores)")
    p.add_argument("--seconds", type=float, default=0.1, help="time per layer and square product per round (default 0.1)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of peak, layers and decode; each figure's best is kept (default 3)")
    args = p.parse_args()
    built = models()
    info = machine()
    cpu = torch.device("cpu")
    records = []
    for model_name in args.models:
        model = built[model_name].to(memory_format=torch.channels_last).eval()
        z = torch.randn(args.batch, model.latent_dim)
        flops = useful_flops(model, z)
        for precision in args.precisions:
            prepared = prepare_for_inference(model, setup("cpu", precision))
            calls = layer_calls(prepared, z)

            def decode(prepared=prepared):
                with torch.inference_mode():
                    prepared.decode(z)
            # rounds of (peak, layers, whole decode), keeping each one's best: on a shared machine
            # a figure and the peak it is divided by should come from the same minutes
            peak, ms, total_ms = 0.0, [float("inf")] * len(calls), float("inf")
            for _ in range(args.rounds):
                peak = max(peak, *square_rates(DTYPES[precision], cpu, seconds=args.seconds).values())
                ms = [min(a, b) for a, b in zip(ms, time_calls(calls, args.seconds))]
                total_ms = min(total_ms, _best_ms(decode, 3 * args.seconds))
            rows = [{"layer": name, "kind": type(mod).__name__, "flops": flops.get(name, 0), "ms": t,
                     "out_dtype": str(out_dtype).removeprefix("torch.")}
                    for (name, mod, _, _, _, out_dtype), t in zip(calls, ms)]
            print(f"\n### {model_name}, {precision}, batch {args.batch} (peak {peak / 1e9:.0f} GFLOP/s)\n")
            print(markdown(rows, total_ms, peak), flush=True)
            records += [{"benchmark": "layer_table", "model": model_name, "precision": precision, "batch": args.batch,
                         **r, "ms": round(r["ms"], 3),
                         "fraction_of_peak": round(r["flops"] / (r["ms"] / 1000) / peak, 3) if r["flops"] else None}
                        for r in rows]
            records.append({"benchmark": "layer_table", "model": model_name, "precision": precision,
                            "batch": args.batch, "layer": "decode", "flops": sum(r["flops"] for r in rows),
                            "ms": round(total_ms, 3), "peak_gflops": round(peak / 1e9, 1), **info})
    print()
    for record in records:
        emit(record)


if __name__ == "__main__":
    main()
