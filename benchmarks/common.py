"""Shared by the benchmark scripts: machine facts and peak memory, printed with every result.
torch is imported where it is used: benchmarks/seed_tf.py runs in an environment without it."""
from __future__ import annotations

import json
import platform
import resource
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = ("ladder", "frontier")     # the models read from configs/mnist-NAME.json (recipe())
MODELS = ("seed", *RECIPES)          # the choices of every script's --model / --models
MODELS_HELP = ("the seed's, configs/mnist-ladder.json's (ladder, VampPrior; pretrained:mnist-best's "
               "until it was replaced by the spatial frontier model) or configs/mnist-frontier.json's "
               "(spatial; pretrained:mnist-best's architecture now)")


def recipe(name: str) -> dict:
    """configs/mnist-NAME.json for NAME in RECIPES: the settings it changes, as a Config dict ({"data", "model", "train"})."""
    return json.loads((CONFIGS / f"mnist-{name}.json").read_text())


def cpu() -> dict:
    """The processor's model name and whether it has AMX (bf16 matrix units): on x86 Linux from
    /proc/cpuinfo. The figures of one machine say little about another without these."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu": platform.processor() or platform.machine()}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("flags", "").split()
    return {"cpu": fields.get("model name", platform.machine()), "amx_bf16": "amx_bf16" in flags,
            "avx512_bf16": "avx512_bf16" in flags}


def machine() -> dict:
    import torch

    info = {**cpu(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def peak_memory_mb(device) -> dict:
    peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        import torch

        peak["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)
