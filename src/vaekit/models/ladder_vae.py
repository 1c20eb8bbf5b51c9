"""A hierarchical VAE with a top-down inference path (Ladder VAE, Sønderby et al. 2016; the
posterior and prior sharing the top-down path as in NVAE, Vahdat & Kautz 2020).

L stochastic layers z_L (top) .. z_1 of latent_dim each (config.layers_of_z = L):
  bottom-up:  x -> conv stages (the conv family's encoder, padded) -> Linear -> d_1 [B,W];
              d_{l+1} = d_l + MLP(d_l)                                   (deterministic features)
  top layer:  q(z_L|x) = N(head(d_L));  p(z_L) = N(0, I) or the VampPrior
  top-down:   s = MLP(z_L); for l = L-1 .. 1:
                p(z_l | z_>l)    = N(prior_head(s))
                q(z_l | x, z_>l) = N(prior mean + delta, prior logvar + delta'), delta from [s, d_l]
                s = s + MLP([s, z_l])
  decoder:    s -> Linear -> [B,w,base,base] -> stride-2 transposed convolutions -> p(x|z_1..z_L)
The posterior of each lower layer is a correction of its prior (NVAE's residual form), so the
layers start near the prior and the KL of each is a closed-form Gaussian one.

The passes (forward, encode, decode, decode_prior) are hierarchy.py's, which the spatial family shares.
"""
from __future__ import annotations

import torch
from torch import nn

from ..objectives import gaussian_kl, log_normal_pdf
from .model_config import ModelConfig
from .conv_vae import UpConvReLU
from .layers import FlattenHWC, SharedInputHead, UnflattenHWC, full_precision
from .hierarchy import HierarchicalVAE

WIDTH = 512                # the deterministic features of each layer, bottom-up and top-down
DECODER_CHANNELS = 64      # the decoder's first feature map: [64, base, base], then 64, 32 at 14, 28 px


class Residual(nn.Module):
    """x + Linear(ELU(Linear(ELU(x)))), the second layer starting at zero (the block starts as the identity)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.ELU(), nn.Linear(width, width), nn.ELU(), nn.Linear(width, width))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class LadderVAE(HierarchicalVAE):
    def __init__(self, config: ModelConfig | None = None) -> None:
        config = config or ModelConfig(family="ladder")
        if config.conditional:
            raise ValueError("the ladder family is unconditional: drop --conditional (or use --family conv)")
        d, layers = config.latent_dim, config.layers_of_z
        widths = [32 * 2 ** i for i in range(config.stages)]            # [32, 64] for 28x28
        base = config.base_size
        encoder = [nn.Conv2d(config.image_channels, widths[0], 3, stride=2, padding=1), nn.ReLU()]
        for w_in, w_out in zip(widths, widths[1:]):
            encoder += [nn.Conv2d(w_in, w_out, 3, stride=2, padding=1), nn.ReLU()]   # 28 -> 14 -> 7
        encoder += [FlattenHWC(), nn.Linear(widths[-1] * base * base, WIDTH)]
        up = [DECODER_CHANNELS, *reversed(widths)]                     # [64, 64, 32] for 28x28
        decoder = [nn.Linear(WIDTH, base * base * up[0]), nn.ReLU(), UnflattenHWC(up[0], base, base)]
        decoder += [UpConvReLU(w_in, w_out, tf_padding=False) for w_in, w_out in zip(up, up[1:])]
        decoder.append(nn.ConvTranspose2d(up[-1], config.output_channels, 3, stride=1, padding=1))
        super().__init__(config, nn.Sequential(*encoder), nn.Sequential(*decoder))
        # bottom-up: d_1 .. d_L; the top layer's posterior head
        self.up = nn.ModuleList(Residual(WIDTH) for _ in range(layers - 1))
        self.top_posterior = nn.Sequential(nn.ELU(), nn.Linear(WIDTH, 2 * d))
        # top-down: s from z_L, then for each lower layer its prior, posterior correction and update of s
        self.lift = nn.Sequential(nn.Linear(d, WIDTH), Residual(WIDTH))
        self.prior_heads = nn.ModuleList(nn.Sequential(nn.ELU(), nn.Linear(WIDTH, 2 * d)) for _ in range(layers - 1))
        self.posterior_heads = nn.ModuleList(SharedInputHead(nn.ELU(), nn.Linear(2 * WIDTH, 2 * d), a_features=WIDTH)
                                             for _ in range(layers - 1))
        self.merges = nn.ModuleList(nn.Sequential(nn.Linear(WIDTH + d, WIDTH), Residual(WIDTH))
                                    for _ in range(layers - 1))
        for head in self.posterior_heads:        # posteriors start as their priors
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)

    def _bottom_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [B,C,H,W] -> the features d_1 .. d_L, each [B,WIDTH] float32."""
        features = [full_precision(self.encoder(x))]
        for block in self.up:
            features.append(block(features[-1]))
        return features

    def _top_posterior(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z_L|x) from the top features d_L: (mean, logvar), each [B,latent]."""
        return full_precision(self.top_posterior(features[-1])).chunk(2, dim=-1)

    def _top_down(self, z_top: torch.Tensor, features: list[torch.Tensor] | None = None,
                  eps: torch.Tensor | None = None, means: list | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The top-down path from top codes z_top [N,D]. With `features` (bottom-up d_1..d_L, [B,WIDTH]
        each, one per image; N = K*B: K draws of each, draw-major) each lower layer is drawn from
        its posterior with noise eps [N,(L-1)*D], its posterior mean appended to `means` when given;
        without, from its prior with that noise, or at the prior's mean when eps is None.
        Returns (the decoder's input s [N,WIDTH], log p, log q of the lower layers [N] (q: 0 without
        features), their rates [N,L-1])."""
        s = self.lift(z_top)
        log_p = log_q = torch.zeros_like(z_top[:, 0])                    # [N]; no len(): an export keeps N dynamic
        rates = []
        d = self.config.latent_dim
        for i, (prior_head, merge) in enumerate(zip(self.prior_heads, self.merges)):
            mean_p, logvar_p = full_precision(prior_head(s)).chunk(2, dim=-1)
            noise = None if eps is None else eps[:, i * d:(i + 1) * d]
            if features is None:
                z = mean_p if noise is None else self.reparameterize(mean_p, logvar_p, eps=noise)
            else:
                layer = len(self.prior_heads) - 1 - i                     # d_l of this layer, counted from the bottom
                delta = self.posterior_heads[i](s, features[layer])
                delta_mean, delta_logvar = full_precision(delta).chunk(2, -1)
                mean_q, logvar_q = mean_p + delta_mean, logvar_p + delta_logvar
                z = self.reparameterize(mean_q, logvar_q, eps=noise)
                if means is not None:
                    means.append(mean_q)
                log_q = log_q + log_normal_pdf(z, mean_q, logvar_q)
                rates.append(gaussian_kl(mean_q, logvar_q, mean_p, logvar_p))
            log_p = log_p + log_normal_pdf(z, mean_p, logvar_p)
            s = merge(torch.cat([s, z], dim=-1))
        rate = torch.stack(rates, dim=-1) if rates else z_top[:, :0]
        return s, log_p, log_q, rate
