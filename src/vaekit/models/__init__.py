"""Model families. Each is one file with its config dataclass beside it."""
from .conv_vae import ConvVAE, ConvVAEConfig

__all__ = ["ConvVAE", "ConvVAEConfig", "build_model"]


def build_model(config: ConvVAEConfig) -> ConvVAE:
    return ConvVAE(config)
