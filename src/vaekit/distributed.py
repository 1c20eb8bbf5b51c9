"""Device, precision and process setup, in one place, so the rest of the code never asks."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .allocator import keep_freed_memory
from .config import ConfigError


@dataclass
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None   # None: plain fp32

    @property
    def precision(self) -> str:
        return "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"

    def autocast(self):
        """Mixed precision for the forward pass; losses are computed in fp32 (see objectives)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def generator(self, seed: int) -> torch.Generator:
        """A seeded generator on this runtime's device (noise is drawn where it is used)."""
        return torch.Generator(self.device).manual_seed(seed)


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 pays where the hardware has bf16 matrix units: AMX/AVX512-BF16 CPUs, Ampere+ GPUs."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def setup(device: str = "auto", precision: str = "auto") -> Runtime:
    keep_freed_memory()
    dev = resolve_device(device)
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_is_fast(dev))
    return Runtime(dev, torch.bfloat16 if use_bf16 else None)
