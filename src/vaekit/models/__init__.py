"""Model families, one file each: conv_vae.py (the seed's, any size and channel count),
resnet_vae.py (residual stages, for 32-64 px images), ladder_vae.py and spatial_vae.py
(hierarchical: layers of vectors, and grids of latents; hierarchy.py their shared passes) and
vq_vae.py (discrete codes; code_prior.py holds their prior, trained second).
model_config.py holds ModelConfig, which they share (a run's Config, DataConfig and TrainConfig
are in vaekit/config.py); vae.py the base class and its passes."""
from __future__ import annotations

from .model_config import ModelConfig
from .conv_vae import ConvVAE
from .ladder_vae import LadderVAE
from .resnet_vae import ResNetVAE
from .spatial_vae import SpatialVAE
from .vq_vae import VQVAE

__all__ = ["ConvVAE", "LadderVAE", "ResNetVAE", "ModelConfig", "SpatialVAE", "VQVAE", "build_model"]


def build_model(config: ModelConfig) -> ConvVAE | ResNetVAE | LadderVAE | SpatialVAE | VQVAE:
    return {"conv": ConvVAE, "resnet": ResNetVAE, "ladder": LadderVAE, "spatial": SpatialVAE, "vq": VQVAE}[config.family](config)
