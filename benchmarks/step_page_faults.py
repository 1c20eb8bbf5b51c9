"""Minor page faults per training step of the seed's model, with glibc's allocator as it comes and
tuned by `vaekit.cpu.keep_freed_memory` (what training and evaluation do at start-up).

    python benchmarks/step_page_faults.py

Untuned, glibc returns each step's activations (several MB each) to the OS and faults them in
again; tuned, the memory is reused. Each mode runs in a fresh process (the tuning is for the
whole process): 3 steps to warm up, then the faults of STEPS steps are counted. The step is the
seed's (batch 100, random binary images, Adam) in the precision training picks here. One JSON
line: faults per step in each mode and their ratio.
"""
from __future__ import annotations

import resource
import subprocess
import sys

from common import emit, machine

STEPS = 10


def faults_per_step(tuned: bool) -> float:
    """Run in a process of its own: the minor page faults of one training step, averaged."""
    import torch

    from vaekit.cpu import keep_freed_memory
    from vaekit.distributed import bf16_is_fast
    from vaekit.models import ConvVAE, ModelConfig
    from vaekit.objectives import training_loss

    if tuned and not keep_freed_memory():
        raise SystemExit("this C library has no mallopt: nothing to tune")
    torch.manual_seed(0)
    model = ConvVAE(ModelConfig()).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    x = (torch.rand(100, 1, 28, 28) > 0.5).float()
    bf16 = bf16_is_fast(torch.device("cpu"))     # emulated bf16 makes temporaries of its own

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            terms = model(x)
        loss = training_loss(terms).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(STEPS):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / STEPS


def main() -> None:
    if len(sys.argv) > 1:                       # the child: one mode, its figure on stdout
        print(faults_per_step(sys.argv[1] == "tuned"))
        return
    faults = {mode: float(subprocess.run([sys.executable, __file__, mode], capture_output=True, text=True,
                                         check=True).stdout)
              for mode in ("plain", "tuned")}
    emit({"benchmark": "step_page_faults", "steps": STEPS, "faults_per_step_plain": faults["plain"],
          "faults_per_step_tuned": faults["tuned"],
          "ratio": round(faults["plain"] / max(faults["tuned"], 1.0), 1), **machine()})


if __name__ == "__main__":
    main()
