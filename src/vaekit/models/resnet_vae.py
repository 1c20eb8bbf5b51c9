"""A ResNet-style VAE for 32-64 px images (CIFAR-10, CelebA crops), in the spirit of the
residual VAEs of Kingma et al. 2016 and vdvae, without their hierarchy of latents.

Encoder: x [B,C,S,S] -> Conv3x3(w0) -> per stage: ResBlock, Conv3x3 stride 2 (width doubles)
         -> [B,w,4,4] at 32 and 64 px -> ResBlock -> Flatten -> Linear(2*latent).
Decoder: z [B,latent] -> Linear -> [B,w,4,4] -> ResBlock -> per stage: nearest x2 upsampling,
         Conv3x3 (width halves), ResBlock -> ReLU, Conv3x3 -> the likelihood's parameters [B,C*P,S,S].
Stages follow the image size (config.stages: 3 at 32 px, 4 at 64 px); widths start at
BASE_WIDTH and double per stage up to MAX_WIDTH. No normalisation layers: each block's last
convolution starts at zero, so every block starts as the identity and deep stacks train stably
(Goyal et al. 2017; improved-diffusion's zero_module).
"""
from __future__ import annotations

from torch import nn

from .model_config import ModelConfig
from .layers import FlattenHWC, ResBlock, UnflattenHWC
from .vae import VAE

BASE_WIDTH = 32
MAX_WIDTH = 256


class ResNetVAE(VAE):
    def __init__(self, config: ModelConfig | None = None) -> None:
        config = config or ModelConfig(family="resnet")
        widths = [min(BASE_WIDTH * 2 ** i, MAX_WIDTH) for i in range(config.stages + 1)]   # 32 px: 32..256
        base = config.base_size
        encoder = [nn.Conv2d(config.image_channels + config.num_classes, widths[0], 3, padding=1)]
        for w_in, w_out in zip(widths, widths[1:]):
            encoder += [ResBlock(w_in), nn.Conv2d(w_in, w_out, 3, stride=2, padding=1)]   # H -> H/2
        encoder += [ResBlock(widths[-1]), nn.ReLU(), FlattenHWC(),
                    nn.Linear(widths[-1] * base * base, 2 * config.latent_dim)]
        decoder = [nn.Linear(config.latent_dim + config.num_classes, widths[-1] * base * base),
                   UnflattenHWC(widths[-1], base, base), ResBlock(widths[-1])]
        for w_in, w_out in zip(reversed(widths), list(reversed(widths))[1:]):
            decoder += [nn.Upsample(scale_factor=2, mode="nearest"),                       # H -> 2H
                        nn.Conv2d(w_in, w_out, 3, padding=1), ResBlock(w_out)]
        decoder += [nn.ReLU(), nn.Conv2d(widths[0], config.output_channels, 3, padding=1)]
        super().__init__(config, nn.Sequential(*encoder), nn.Sequential(*decoder))
