"""Shared by the benchmark scripts: machine facts and peak memory, printed with every result."""
from __future__ import annotations

import json
import platform
import resource

import torch


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def peak_memory_mb(device: torch.device) -> dict:
    peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        peak["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)
