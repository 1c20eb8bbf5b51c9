"""Interleaved A/B of the CPU training step: what each speed lever is worth, on real MNIST.

    python benchmarks/step_ab.py --rounds 15
    python benchmarks/step_ab.py --precision fp32 --variants vaekit unfused_relu
    python benchmarks/step_ab.py --config configs/mnist-frontier.json --variants vaekit compiled --rounds 3

Variants: `vaekit` (as training runs), `unfused_relu` (the decoder's ReLU as a separate pass
instead of inside the transposed convolution), `per_tensor_adam` (Adam without fused=True),
`autograd_last_layer` (the stride-1 output layer through vaekit's transposed-conv backward
instead of autograd's), `subpixel_last_layer` (that layer in the subpixel form evaluation uses,
models/inference.py, its weights rebuilt from the parameter every step), `compiled` (the model under
torch.compile as `--compile on` runs it; round 0, the warm-up, compiles). Each round runs every variant for --steps steps of
`vaekit.train.train_step` in turn (order alternating), in one process: two processes on a shared
machine differ by more than these levers do. Prints one JSON line per variant: the median ms/step over rounds.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import emit, machine

import vaekit
from vaekit.data import splits_for
from vaekit.distributed import setup
from vaekit.models import build_model, layers
from vaekit.models.inference import conv_transpose_as_conv, subpixel_conv
from vaekit.checkpoints import Progress
from vaekit.compiling import for_training
from vaekit.schedule import Schedule
from vaekit.train import TrainState, train_step


VARIANTS = ["vaekit", "unfused_relu", "per_tensor_adam", "autograd_last_layer", "subpixel_last_layer", "compiled"]


class _SubpixelTraining(torch.nn.Module):
    """The stride-1 output layer trained in subpixel form: the same function and gradients."""

    def __init__(self, layer: torch.nn.ConvTranspose2d, stride: int = 4) -> None:
        super().__init__()
        self.layer, self.stride = layer, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, padding = conv_transpose_as_conv(self.layer.weight, self.layer.padding[0])
        weight, bias = subpixel_conv(weight, self.layer.bias, self.stride)
        y = F.conv2d(x, weight.contiguous(memory_format=torch.channels_last), bias, stride=self.stride, padding=padding)
        return F.pixel_shuffle(y, self.stride)


@contextlib.contextmanager
def _unfused_relu():
    fusable = layers.onednn_runs
    layers.onednn_runs = lambda x: False
    try:
        yield
    finally:
        layers.onednn_runs = fusable


def _variant(name: str, config: vaekit.Config, rt):
    torch.manual_seed(0)
    model = build_model(config.model).to(memory_format=torch.channels_last)
    if name == "autograd_last_layer":
        model.decoder[-1] = layers.ConvTranspose2d(*model.decoder[-1].weight.shape[:2], 3, stride=1, padding=1).to(
            memory_format=torch.channels_last)
    if name == "subpixel_last_layer":
        model.decoder[-1] = _SubpixelTraining(model.decoder[-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr, fused=name != "per_tensor_adam")
    context = _unfused_relu if name == "unfused_relu" else contextlib.nullcontext
    stepped = for_training(model, "on", rt, print) if name == "compiled" else model
    return model, stepped, optimizer, rt.generator(1), context


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, help="a config file (configs/*.json) whose model and training settings "
                   "are timed (default: the seed's)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=40, help="steps per variant per round")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS,
                   help="the variants to time (default: all)")
    args = p.parse_args()

    config = vaekit.Config.load(args.config) if args.config else vaekit.Config()
    rt = setup("cpu", args.precision)
    images = splits_for(config.data, log=lambda *_: None).train.images
    names = args.variants
    variants = {name: _variant(name, config, rt) for name in names}
    order = torch.Generator().manual_seed(0)
    times = {name: [] for name in names}
    for r in range(args.rounds + 1):           # round 0 warms up (oneDNN builds its kernels)
        batches = torch.randperm(len(images), generator=order)[:args.steps * 100].split(100)
        for name in names if r % 2 else names[::-1]:
            model, stepped, optimizer, noise, context = variants[name]
            state = TrainState(model, stepped, optimizer, order, noise, Progress(), order.get_state(),
                               torch.zeros(len(batches), dtype=torch.float64))
            schedule = Schedule(config.train, len(batches))
            with context():
                start = time.perf_counter()
                for idx in batches:
                    train_step(state, images[idx], None, config, rt, schedule)
                    state.at.step += 1
                if r:
                    times[name].append(1000 * (time.perf_counter() - start) / len(batches))
    for name in names:
        emit({"benchmark": "step_ab", "family": config.model.family, "variant": name, "batch_size": 100, "precision": rt.precision,
              "rounds": args.rounds, "ms_per_step_median": round(statistics.median(times[name]), 2),
              "ms_per_step_min": round(min(times[name]), 2), **machine()})


if __name__ == "__main__":
    main()
