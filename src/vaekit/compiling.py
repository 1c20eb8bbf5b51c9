"""torch.compile in vaekit: `--compile auto|on|off` (TrainConfig.compile).

- on: training steps run the model through torch.compile (DDP wraps the compiled module from
  outside; checkpoints hold the plain model's weights), and a prepared model (eval, sample) runs
  each of its networks compiled.
- auto: on for CUDA, off on CPU, but for the IWAE pass of the families in COMPILED_EVALUATION in
  evaluations of COMPILE_PAYS decodes or more.
  On CPU the compiled training step measured about 10% slower than eager and the prepared decode
  the same (docs/benchmarks.md): inductor calls the same oneDNN convolutions eager does and fuses
  only their elementwise tails. Where those tails are much of the work, as in the spatial
  family's top-down path (soft clamps, Gaussian densities, casts between its convolutions), the
  compiled IWAE pass is faster (`log_weights`).
- off: eager.
One case is refused: the resnet family's training step in bf16, whose compiled gradients are
wrong under torch 2.13's inductor (some layers' exactly zero; eager and aot_eager agree).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from .errors import ConfigError, RunError
from .evaluate import LogWeights
from .models.inference import Precision

WRONG_GRADIENTS = "torch.compile (inductor, torch 2.13) computes wrong gradients for the resnet family in bf16"


# The families whose IWAE pass `--compile auto` compiles on CPU too: `benchmarks/eval_throughput.py
# --model M [--compile]`, run ABAB on a quiet 2-core AMD EPYC with AVX512-BF16, bf16, decodes/s:
# spatial (frontier) 3,779 and 3,370 compiled against 2,890 and 2,438 eager (1.31x, 1.38x). Not the
# ladder (best: 11,190 and 10,595 against 11,773 and 8,765, no steady gain, and its bf16 log weights
# move by up to 0.14 nats compiled) nor the seed's conv family (16,199 and 14,666 against 17,809 and 16,862).
COMPILED_EVALUATION = ("spatial",)
COMPILE_PAYS = 1_000_000    # decodes from which auto compiles there: about 4 min eager, against a compile of 5-30 s


def compiling(setting: str, device: torch.device) -> bool:
    """Whether `--compile setting` compiles on `device` (auto: on CUDA only)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def cache_folder() -> str:
    """Inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR, else /tmp/torchinductor_USER)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    return cache_dir()


class Compiled(nn.Module):
    """`module` under torch.compile: its first call (the compile) is timed and told to `log`, and a
    failed compile is a one-line RunError naming the cache to delete (a compile killed half-way can
    leave a truncated shared object there that every later compile of that kernel loads)."""

    def __init__(self, module: nn.Module, log) -> None:
        super().__init__()
        self.compiled = torch.compile(module)
        self.log = log
        self.first_call = True

    def forward(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            out = self.compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            first = next((line for line in str(e).splitlines()[1:] if line.strip()), str(e))
            raise RunError(f"torch.compile failed ({first.strip()}); if a compile was killed before, delete the "
                           f"damaged cache {cache_folder()} and run again, or pass --compile off") from e
        if self.first_call:
            self.first_call = False
            backward = "; its backward compiles at the first backward" if torch.is_grad_enabled() else ""
            self.log(f"torch.compile: the first call took {time.perf_counter() - started:.1f} s (compiling{backward}; "
                     f"cached in {cache_folder()})")
        return out


def for_training(model: nn.Module, setting: str, rt, log) -> nn.Module:
    """What training steps call: `model` compiled when `setting` says so on rt's device, else
    `model` itself (which checkpoints always save)."""
    if not compiling(setting, rt.device):
        return model
    if model.config.family == "resnet" and rt.autocast_dtype == torch.bfloat16:
        if setting == "on":
            raise ConfigError(f"{WRONG_GRADIENTS}: pass --compile off (or --precision fp32)")
        log(f"--compile auto: training eagerly, as {WRONG_GRADIENTS}")
        return model
    return Compiled(model, log)


def for_inference(prepared: nn.Module, setting: str, device: torch.device) -> nn.Module:
    """`prepared` (models/inference.py) with each of its networks compiled in place, when
    `setting` says so on `device`; the glue between them (likelihoods, sums over draws) stays
    eager, so every method of the model (forward, decode, decode_prior) runs compiled networks."""
    if compiling(setting, device):
        for module in prepared.modules():
            if isinstance(module, Precision):
                module.compile()
    return prepared


def log_weights(model: nn.Module, setting: str, device: torch.device, log, decodes: int):
    """What the IWAE pass (evaluate.iwae_bounds) calls for a pass's log weights: the prepared
    `model`'s whole forward under torch.compile when `setting` says so on `device` (auto: on CUDA,
    and on CPU for the families in COMPILED_EVALUATION in an evaluation of COMPILE_PAYS `decodes`
    or more), else None (the eager forward)."""
    pays = model.config.family in COMPILED_EVALUATION and decodes >= COMPILE_PAYS
    if compiling(setting, device) or (setting == "auto" and pays):
        return Compiled(LogWeights(model), log)
    return None
