"""A hierarchy of latent grids: the top-down VAE of NVAE (Vahdat & Kautz 2020) and VDVAE (Child
2021), small enough for a CPU. Where the ladder family's lower layers are vectors, which a strong
decoder learns to ignore, each layer here is a grid of latents at one of the decoder's own
resolutions (7x7 and 14x14 for 28x28 images), so every layer has detail of its own to carry.

Scales: the decoder's grids from config.base_size up, doubling (28 px: 7, 14; 32 px: 4, 8, 16),
widths hidden_channels, halving per scale (64 at 7x7, 32 at 14x14), so a convolution costs
about the same at every scale. G = config.latent_groups groups of latents per scale, each a grid
of config.latent_channels channels; one top layer z_top [latent_dim], the code the tools see.

  bottom-up:  x -> Conv s2 -> ResBlocks -> h at the finest scale; each `up` stage: Conv s2,
              ResBlocks -> h at the next scale down (h_7, h_14 for 28 px)
  top layer:  q(z_top|x) = N(Linear(h at the smallest scale));  p(z_top) = N(0, I) or the VampPrior
  top-down:   s = lift(z_top) [w, base, base]; for each scale (smallest first; `upsample`s between):
                for each of its G groups g:
                  s = cells[g](s)                                   (ResBlocks)
                  p(z_g | z_>g)    = N(prior_heads[g](s))           (a 3x3 convolution)
                  q(z_g | x, z_>g) = N(prior mean + delta, prior logvar + delta'),
                                     delta from posterior_heads[g]([s, h at this scale])
                                     (h's half once per image: layers.SharedInputHead)
                  s = s + merges[g](z_g)                            (a 1x1 convolution)
  decoder:    s -> ConvTranspose s2 -> ReLU -> Conv3x3 -> p(x | all layers)
The posteriors are residual corrections of their priors (NVAE's form; they start equal to them),
so each group's KL is a closed-form Gaussian one; every head's means and log-scales are softly
bounded (NVAE's soft clamp: without it, two-block cells diverge in the first steps), and every head and block that starts at zero
makes the network start as a shallow one that deepens as it learns. Every member of a ModuleList
takes one tensor, so models/inference.py can put each in the run's precision. The passes
(forward, encode, decode, decode_prior) are hierarchy.py's, which the ladder family shares.
"""
from __future__ import annotations

import torch
from torch import nn

from ..objectives import gaussian_kl, log_normal_pdf, log_normal_pdf_of_draw
from .layers import ConvTranspose2d, FlattenHWC, ResBlock, SharedInputHead, UnflattenHWC, full_precision
from .model_config import ModelConfig
from .hierarchy import HierarchicalVAE

MIN_WIDTH = 16      # the narrowest feature map, however many scales the image has
BOUND = 5.0         # every head's means and log standard deviations lie in (-BOUND, BOUND)
# A group's densities sum over all its units in one reduction, not over a flattened copy: its
# tensors are channels_last, so a flatten(1) reads them out of order (compiled: a scalar loop).
UNITS = (1, 2, 3)


def bounded_gaussian(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A head's output [N,2C,...] -> (mean, logvar) [N,C,...] each, float32, softly bounded as
    NVAE's soft_clamp5 does: mean = 5 tanh(m / 5), log sigma likewise (logvar within +-10). Near
    zero, where the heads start, it is the identity; unbounded, a few early steps of the KL
    warm-up (the rate's weight near 0) let the rates of two-block cells run to inf.

    The bound is one per channel, so the clamp runs over the head's whole output before the halves
    are split: compiled, its channels_last tensor is then read in full-width vectors, where each
    half alone fills half of one (an 8-channel group: the frontier's IWAE pass 1.17x faster on AMX).
    The bounds are filled on out's device: a tensor made from a Python list would be a blocking
    host-to-device copy on a GPU, at every head of every step."""
    out = full_precision(out)
    half = (1, out.shape[1] // 2, *[1] * (out.dim() - 2))
    bounds = torch.cat((out.new_full(half, BOUND), out.new_full(half, 2 * BOUND)), dim=1)
    return (bounds * torch.tanh(out / bounds)).chunk(2, dim=1)


def _zero_last(head: nn.Sequential) -> nn.Sequential:
    """`head` with its last layer's weights and bias at zero: it starts by outputting zeros."""
    nn.init.zeros_(head[-1].weight)
    nn.init.zeros_(head[-1].bias)
    return head


def _blocks(width: int, n: int) -> nn.Sequential:
    return nn.Sequential(*(ResBlock(width) for _ in range(n)))


class SpatialVAE(HierarchicalVAE):
    def __init__(self, config: ModelConfig | None = None) -> None:
        config = config or ModelConfig(family="spatial")
        if config.conditional:
            raise ValueError("the spatial family is unconditional: drop --conditional (or use --family conv)")
        base, blocks, groups = config.base_size, config.res_blocks, config.latent_groups
        self.scales = [base << i for i in range(config.stages)]                  # [7, 14] for 28 px
        self.widths = [max(config.hidden_channels >> i, MIN_WIDTH) for i in range(config.stages)]   # [64, 32]
        fine = self.widths[-1]
        encoder = nn.Sequential(nn.Conv2d(config.image_channels, fine, 3, stride=2, padding=1), *_blocks(fine, blocks))
        decoder = nn.Sequential(ConvTranspose2d(fine, max(fine // 2, MIN_WIDTH), 4, stride=2, padding=1, relu=True),
                                nn.Conv2d(max(fine // 2, MIN_WIDTH), config.output_channels, 3, padding=1))
        super().__init__(config, encoder, decoder)
        down = list(reversed(self.widths))                                        # [32, 64]
        self.up = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Conv2d(w_in, w_out, 3, stride=2, padding=1),
                                              *_blocks(w_out, blocks)) for w_in, w_out in zip(down, down[1:]))
        top = self.widths[0] * base * base
        self.top_posterior = nn.Sequential(nn.ReLU(), FlattenHWC(), nn.Linear(top, 2 * config.latent_dim))
        self.lift = nn.Sequential(nn.Linear(config.latent_dim, top), UnflattenHWC(self.widths[0], base, base))
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(w_in, w_out, 4, stride=2, padding=1)
                                      for w_in, w_out in zip(self.widths, self.widths[1:]))
        cz = config.latent_channels
        group_widths = [w for w in self.widths for _ in range(groups)]
        self.cells = nn.ModuleList(_blocks(w, blocks) for w in group_widths)
        self.prior_heads = nn.ModuleList(_zero_last(nn.Sequential(nn.ReLU(), nn.Conv2d(w, 2 * cz, 3, padding=1)))
                                         for w in group_widths)
        self.posterior_heads = nn.ModuleList(
            _zero_last(SharedInputHead(nn.ReLU(), nn.Conv2d(2 * w, 2 * cz, 3, padding=1), a_features=w))
            for w in group_widths)
        self.merges = nn.ModuleList(nn.Conv2d(cz, w, 1) for w in group_widths)

    @property
    def group_shapes(self) -> list[tuple[int, int, int]]:
        """The [C,H,W] of each group of latents below the top layer, in top-down order."""
        return [(self.config.latent_channels, size, size) for size in self.scales for _ in range(self.config.latent_groups)]

    @property
    def noise_dim(self) -> int:
        """Standard-normal draws one pass takes per image: the top layer's, then each group's grid."""
        return self.config.latent_dim + sum(c * h * w for c, h, w in self.group_shapes)

    def _bottom_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [B,C,H,W] -> the features h of each scale, smallest first: [B,w_i,size_i,size_i] each."""
        features = [self.encoder(x)]
        for stage in self.up:
            features.append(stage(features[-1]))
        return features[::-1]

    def _top_posterior(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z_top|x) from the smallest scale's features: (mean, logvar), each [B,latent]."""
        return bounded_gaussian(self.top_posterior(features[0]))

    def _top_down(self, z_top: torch.Tensor, features: list[torch.Tensor] | None = None,
                  eps: torch.Tensor | None = None, means: list | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The top-down path from top codes z_top [N,D]. With `features` (the bottom-up h of each
        scale, [B,...], one per image; N = K*B: K draws of each, draw-major) each group is drawn
        from its posterior with noise eps [N,noise_dim - D], its posterior mean [N,units] appended
        to `means` when given; without, from its prior with that noise, or at the prior's mean
        when eps is None.
        Returns (the decoder's input s, log p and log q of the groups [N] (q: 0 without
        features), their rates [N,groups])."""
        s = self.lift(z_top)
        log_p = log_q = torch.zeros_like(z_top[:, 0])                    # [N]; no len(): an export keeps N dynamic
        rates, offset, groups = [], 0, self.config.latent_groups
        for g, shape in enumerate(self.group_shapes):
            scale = g // groups
            if g and g % groups == 0:
                s = self.upsample[scale - 1](s)
            s = self.cells[g](s)
            mean_p, logvar_p = bounded_gaussian(self.prior_heads[g](s))                   # [N,cz,h,w] each
            size = mean_p[0].numel()
            noise = None if eps is None else eps[:, offset:offset + size].view_as(mean_p)
            offset += size
            if features is None:
                z = mean_p if noise is None else self.reparameterize(mean_p, logvar_p, eps=noise)
            else:
                delta_mean, delta_logvar = bounded_gaussian(self.posterior_heads[g](s, features[scale]))
                mean_q, logvar_q = mean_p + delta_mean, logvar_p + delta_logvar
                z = self.reparameterize(mean_q, logvar_q, eps=noise)
                if means is not None:
                    means.append(mean_q.flatten(1))
                log_q = log_q + log_normal_pdf_of_draw(noise, logvar_q, dim=UNITS)
                rates.append(gaussian_kl(mean_q, logvar_q, mean_p, logvar_p, dim=UNITS))
            log_p = log_p + log_normal_pdf(z, mean_p, logvar_p, dim=UNITS)
            s = s + self.merges[g](z)
        rate = torch.stack(rates, dim=-1) if rates else z_top[:, :0]
        return s, log_p, log_q, rate
