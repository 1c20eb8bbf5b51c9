"""Model families, one file each: conv_vae.py (the seed's, any size and channel count),
resnet_vae.py (residual stages, for 32-64 px images), ladder_vae.py (hierarchical) and
vq_vae.py (discrete codes; code_prior.py holds their prior, trained second).
model_config.py holds ModelConfig, which they share (a run's Config, DataConfig and TrainConfig
are in vaekit/config.py); vae.py the base class and its passes."""
from __future__ import annotations

from .model_config import ModelConfig
from .conv_vae import ConvVAE
from .ladder_vae import LadderVAE
from .resnet_vae import ResNetVAE
from .vq_vae import VQVAE

__all__ = ["ConvVAE", "LadderVAE", "ResNetVAE", "ModelConfig", "VQVAE", "build_model"]


def build_model(config: ModelConfig) -> ConvVAE | ResNetVAE | LadderVAE | VQVAE:
    return {"conv": ConvVAE, "resnet": ResNetVAE, "ladder": LadderVAE, "vq": VQVAE}[config.family](config)
