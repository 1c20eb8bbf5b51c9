"""Model families, one file each: conv_vae.py (the seed's, any size and channel count) and
resnet_vae.py (residual stages, for 32-64 px images), ladder_vae.py (hierarchical); config.py holds what they share."""
from __future__ import annotations

from .config import ModelConfig
from .conv_vae import ConvVAE
from .ladder_vae import LadderVAE
from .resnet_vae import ResNetVAE

__all__ = ["ConvVAE", "LadderVAE", "ResNetVAE", "ModelConfig", "build_model"]


def build_model(config: ModelConfig) -> ConvVAE | ResNetVAE | LadderVAE:
    return {"conv": ConvVAE, "resnet": ResNetVAE, "ladder": LadderVAE}[config.family](config)
