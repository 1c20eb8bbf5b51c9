"""The seed's convolutional VAE (TF2 CVAE tutorial), as a plain PyTorch module.

Encoder: x [B,1,28,28] -> Conv(32,3,s2,ReLU) [B,32,13,13] -> Conv(64,3,s2,ReLU) [B,64,6,6]
         -> Flatten [B,2304] -> Linear(2*latent) -> split into mean, logvar [B,latent] each.
Decoder: z [B,latent] -> Linear(7*7*32,ReLU) -> [B,32,7,7] -> ConvT(64,3,s2,ReLU) [B,64,14,14]
         -> ConvT(32,3,s2,ReLU) [B,32,28,28] -> ConvT(1,3,s1) -> logits [B,1,28,28].

TF's "SAME" stride-2 transposed conv keeps the first 14 of the 15 full-output rows. PyTorch's
`padding=1, output_padding=1` reaches 14 without a crop (faster: no strided copy in the backward),
but keeps rows 1..14 instead: the output grid is shifted by one pixel. That is the default;
`tf_padding=True` computes the full output and crops it exactly as TF does (exact parity).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import ConvTranspose2d, FlattenHWC, UnflattenHWC


@dataclass
class ConvVAEConfig:
    latent_dim: int = 50          # the seed's code size
    image_channels: int = 1
    image_size: int = 28          # the seed's architecture is fixed to 28x28
    tf_padding: bool = False      # exact TF "SAME" cropping in the decoder (slower); see module doc

    def __post_init__(self) -> None:
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}: pass --latent-dim 1 or more")
        if self.image_size != 28:
            raise ValueError(f"conv_vae is the seed's 28x28 architecture, got image_size {self.image_size}")


class UpConvReLU(nn.Module):
    """ConvTranspose(k=3, stride 2) doubling H and W, then ReLU. The parameter names do not
    depend on `tf_padding`, so one checkpoint loads into either decoder."""

    def __init__(self, in_ch: int, out_ch: int, tf_padding: bool) -> None:
        super().__init__()
        self.tf_padding = tf_padding
        pad = 0 if tf_padding else 1
        self.conv = ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=pad, output_padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)                 # [B,out,2H+1,2W+1] with tf_padding, else [B,out,2H,2W]
        if self.tf_padding:
            y = y[..., :-1, :-1]         # TF SAME: keep the first 2H rows and columns
        return torch.relu(y)


class ConvVAE(nn.Module):
    def __init__(self, config: ConvVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ConvVAEConfig()
        c, latent = config.image_channels, config.latent_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(c, 32, 3, stride=2), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2), nn.ReLU(),
            FlattenHWC(),                                   # TF's NHWC order
            nn.Linear(64 * 6 * 6, 2 * latent),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent, 7 * 7 * 32), nn.ReLU(),
            UnflattenHWC(32, 7, 7),                         # Keras Reshape((7, 7, 32))
            UpConvReLU(32, 64, config.tf_padding),          # [B,64,14,14]
            UpConvReLU(64, 32, config.tf_padding),          # [B,32,28,28]
            nn.ConvTranspose2d(32, c, 3, stride=1, padding=1),  # logits; autograd's backward is the faster one here
        )
        self._keras_init()

    def _keras_init(self) -> None:
        """Keras defaults, as the seed had them: Glorot-uniform kernels, zero biases."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,C,28,28] -> (mean, logvar), each [B,latent] in float32 (even under autocast)."""
        mean, logvar = self.encoder(x).float().chunk(2, dim=1)
        return mean, logvar

    @staticmethod
    def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None,
                       eps: torch.Tensor | None = None) -> torch.Tensor:
        """z = mean + exp(logvar/2) * eps, eps ~ N(0, I) drawn from `generator` unless given; [B,latent].
        Distributed training passes `eps`: its rows of noise drawn for the whole global batch."""
        if eps is None:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return eps * torch.exp(logvar * 0.5) + mean

    def decode(self, z: torch.Tensor, apply_sigmoid: bool = False) -> torch.Tensor:
        """z [B,latent] -> logits [B,C,28,28] (probabilities with apply_sigmoid)."""
        logits = self.decoder(z)
        return torch.sigmoid(logits) if apply_sigmoid else logits

    def sample(self, eps: torch.Tensor | None = None, n: int = 100,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Decodes prior draws (or the given codes `eps` [n,latent]) to probabilities [n,C,28,28]."""
        if eps is None:
            device = next(self.parameters()).device
            eps = torch.randn(n, self.latent_dim, generator=generator, device=device)
        return self.decode(eps, apply_sigmoid=True)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, eps: torch.Tensor | None = None):
        """One pass of the seed's estimator: returns (logits, z, mean, logvar). `eps` [B,latent]: the
        reparameterization noise, when the caller draws it (see `reparameterize`)."""
        mean, logvar = self.encode(x)
        z = self.reparameterize(mean, logvar, generator, eps)
        return self.decode(z), z, mean, logvar
