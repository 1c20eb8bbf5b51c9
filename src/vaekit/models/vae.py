"""What every model family shares: q(z|x) and p(x|z) around an encoder and a decoder network.

A family (conv_vae.py, resnet_vae.py) builds two networks and passes them here:
  encoder: [B, C + classes, H, W] -> [B, 2 * latent]       (mean and log-variance of q(z|x))
  decoder: [B, latent + classes] -> [B, C * P, H, W]       (the likelihood's P parameters per channel)
A class-conditional model (config.conditional) sees the one-hot label [B, classes] as extra
constant input channels of the encoder and beside z at the decoder; `classes` is 0 otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class VAE(nn.Module):
    def __init__(self, config: ModelConfig, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        if config.conditional and not config.num_classes:
            raise ValueError("a conditional model needs num_classes (training sets it from the data)")
        self.config = config
        self.likelihood = config.likelihood_fn
        self.encoder = encoder
        self.decoder = decoder

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def _one_hot(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """Labels y [B] (int) -> one-hot [B, classes] float32, or None for an unconditional model."""
        if not self.config.conditional:
            if y is not None:
                raise ValueError("this model is not class-conditional: give no label")
            return None
        if y is None:
            raise ValueError("this model is class-conditional: give the labels")
        return F.one_hot(y.long(), self.config.num_classes).float()

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,C,H,W] (and labels y [B] for a conditional model) -> (mean, logvar), each
        [B,latent] in float32 (even under autocast)."""
        one_hot = self._one_hot(y)
        if one_hot is not None:
            x = torch.cat([x, one_hot[:, :, None, None].expand(-1, -1, *x.shape[2:]).to(x)], dim=1)
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

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None, as_image: bool = False) -> torch.Tensor:
        """z [B,latent] (and labels y [B]) -> the likelihood's parameters [B,C*P,H,W] (Bernoulli:
        logits), or with `as_image` the image they mean, [B,C,H,W] in [0,1] (Bernoulli: probabilities)."""
        one_hot = self._one_hot(y)
        if one_hot is not None:
            z = torch.cat([z, one_hot.to(z)], dim=1)
        params = self.decoder(z)
        return self.likelihood.mean(params) if as_image else params

    def sample(self, eps: torch.Tensor | None = None, n: int = 100, generator: torch.Generator | None = None,
               y: torch.Tensor | None = None) -> torch.Tensor:
        """Decodes prior draws (or the given codes `eps` [n,latent]) to images [n,C,H,W] in [0,1]."""
        if eps is None:
            device = next(self.parameters()).device
            eps = torch.randn(n, self.latent_dim, generator=generator, device=device)
        return self.decode(eps, y, as_image=True)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, eps: torch.Tensor | None = None,
                y: torch.Tensor | None = None):
        """One pass of the seed's estimator: returns (params, z, mean, logvar). `eps` [B,latent]: the
        reparameterization noise, when the caller draws it (see `reparameterize`). With eps
        [K,B,latent], K draws per image (the IWAE objective): z [K,B,latent], params [K,B,C*P,H,W]."""
        mean, logvar = self.encode(x, y)
        z = self.reparameterize(mean, logvar, generator, eps)
        if z.dim() == 2:
            return self.decode(z, y), z, mean, logvar
        k = z.shape[0]
        params = self.decode(z.flatten(0, 1), None if y is None else y.repeat(k)).unflatten(0, (k, len(x)))
        return params, z, mean, logvar
