"""The learned prior of the VQ-VAE family: a small causal transformer over the h x w grid of codes
in raster order (row by row, left to right), p(c) = prod_i p(c_i | c_<i).

The grid [B,h,w] is read as a sequence of L = h*w codes. The input at position i is the code at
i - 1 (a start token at 0), and self-attention is masked to positions <= i, so the logits at i,
those of p(c_i | c_<i), see the codes before i and nothing else: exactly causal, the masked
weights being exact zeros. `sample` draws the codes one position at a time, and, given some of
the codes, draws only the others; `inpaint_codes` uses it to fill the codes an image's hole
reaches, by importance resampling against the observed pixels.

The two-stage bound (`vq_log_likelihood`) is written out in docs/architecture-vq.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .vq_vae import VQVAE


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class PriorConfig:
    codebook_size: int = _f(512, "the values of each code: the VQ model's codebook_size")
    grid_size: int = _f(7, "the side of the code grid: the VQ model's grid_size")
    width: int = _f(128, "prior: the transformer's width")
    layers: int = _f(4, "prior: transformer blocks")
    heads: int = _f(4, "prior: attention heads (they divide the width)")

    def __post_init__(self) -> None:
        for name in ("codebook_size", "grid_size", "width", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"prior {name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ConfigError(f"the prior's heads ({self.heads}) must divide its width ({self.width})")

    @classmethod
    def for_model(cls, vq: VQVAE, **sizes) -> PriorConfig:
        """The prior of `vq`'s codes, with the transformer's `sizes` (width, layers, heads; default:
        its config's prior_width, prior_layers, prior_heads)."""
        c = vq.config
        sizes = {"width": c.prior_width, "layers": c.prior_layers, "heads": c.prior_heads, **sizes}
        return cls(codebook_size=c.codebook_size, grid_size=c.grid_size, **sizes)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x MLP; [B,L,W] -> [B,L,W]."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)          # [B,heads,L,W/heads]
        h = h + self.proj(attended.transpose(1, 2).reshape(b, n, w))
        return h + self.mlp(self.norm2(h))


class CodePrior(nn.Module):
    def __init__(self, config: PriorConfig | None = None) -> None:
        super().__init__()
        config = config or PriorConfig()
        self.config = config
        length = config.grid_size ** 2
        self.start = config.codebook_size                                   # the start token's index
        self.token = nn.Embedding(config.codebook_size + 1, config.width)
        self.position = nn.Parameter(torch.randn(length, config.width) * 0.02)
        self.blocks = nn.ModuleList(Block(config.width, config.heads) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.codebook_size)

    def logits(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes [B,h,w] -> the logits of p(c_i | c_<i) at every position, [B,h,w,K] (float32)."""
        b, h, w = indices.shape
        codes = indices.reshape(b, h * w)
        inputs = torch.cat([codes.new_full((b, 1), self.start), codes[:, :-1]], dim=1)   # [B,L] shifted right
        x = self.token(inputs) + self.position                                              # [B,L,W]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).float().view(b, h, w, -1)

    def log_prob(self, indices: torch.Tensor) -> torch.Tensor:
        """log p(c) of code grids [B,h,w] -> [B], nats: the sum over positions of log p(c_i | c_<i)."""
        log_p = F.log_softmax(self.logits(indices), dim=-1)                                  # [B,h,w,K]
        return log_p.gather(-1, indices[..., None]).flatten(1).sum(1)

    @torch.inference_mode()
    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0,
               given: torch.Tensor | None = None, known: torch.Tensor | None = None) -> torch.Tensor:
        """n code grids [n,h,w] drawn in raster order from p(c_i | c_<i) ** (1/temperature).
        With `given` codes [n,h,w] and `known` [n,h,w] (bool), the known positions keep their
        codes and the others are drawn in raster order given every code before them, known or
        drawn: a draw from prod_{i unknown} p(c_i | c_<i), which ignores what the known codes
        after i say about c_i (the exact conditional would need all of p(c); an autoregressive
        prior gives it only for a known prefix, as when the hole is at the bottom).
        Draws come from `generator` (on the model's device)."""
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        side = self.config.grid_size
        device = self.position.device
        if (given is None) != (known is None):
            raise ValueError("sample takes both `given` and `known`, or neither")
        length = side * side
        flat = (torch.zeros(n, length, dtype=torch.long, device=device) if given is None
                else given.reshape(n, length).to(device, torch.long, copy=True))            # [n,L]
        known_flat = None if known is None else known.reshape(n, length).to(device)
        for i in range(length):
            if known_flat is not None and bool(known_flat[:, i].all()):
                continue
            logits = self.logits(flat.view(n, side, side)).view(n, length, -1)[:, i] / temperature   # [n,K]
            drawn = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
            flat[:, i] = drawn if known_flat is None else torch.where(known_flat[:, i], flat[:, i], drawn)
        return flat.view(n, side, side)


def prior_train_step(prior: CodePrior, optimizer: torch.optim.Optimizer, indices: torch.Tensor) -> float:
    """One step of the second stage on code grids [B,h,w] of the frozen VQ model: the mean
    -log p(c). Returns it, nats per image."""
    prior.train()
    loss = -prior.log_prob(indices).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.inference_mode()
def inpaint_codes(vq: VQVAE, prior: CodePrior, x: torch.Tensor, observed: torch.Tensor,
                  generator: torch.Generator | None = None, proposals: int = 64) -> torch.Tensor:
    """Codes [B,h,w] for preprocessed images x [B,C,H,W] of which only the pixels where
    `observed` [B,1 or C,H,W] is True are known: the codes whose receptive field is all observed
    (vq.unknown_codes) are the encoder's; the others are drawn by sampling-importance-resampling
    from p(c_U | c_K, x_obs), proposals drawn from the prior given the known codes before them
    (`sample`), weighted by how well they explain the observed pixels:
      w = p(x_obs | c) * prod_{i known} p(c_i | c_<i)     (= p(c) p(x_obs|c) / proposal(c_U))
    then one proposal per image drawn in proportion to w. With few known codes (a large hole, or
    the default encoder's wide field) it is the best of `proposals` prior draws at explaining
    x_obs, more than a draw of the posterior: the weights are far from even."""
    b, m = len(x), proposals
    observed = observed.bool().expand_as(x)
    known = ~vq.unknown_codes(observed)                                                  # [B,h,w]
    given = vq.codes(x * observed)                                                       # hidden pixels as 0
    draws = prior.sample(b * m, generator, given=given.repeat_interleave(m, 0),
                         known=known.repeat_interleave(m, 0))                            # [B*M,h,w]
    log_p = F.log_softmax(prior.logits(draws), -1).gather(-1, draws[..., None])[..., 0]  # [B*M,h,w]
    log_w = (log_p * known.repeat_interleave(m, 0)).flatten(1).sum(1) + vq.likelihood.log_prob(
        x.repeat_interleave(m, 0), vq.decode_indices(draws), observed.repeat_interleave(m, 0))  # [B*M]
    pick = torch.multinomial(F.softmax(log_w.view(b, m), dim=1), 1, generator=generator)[:, 0]  # [B]
    return draws.view(b, m, *draws.shape[1:])[torch.arange(b, device=pick.device), pick]


@torch.inference_mode()
def vq_log_likelihood(vq: VQVAE, prior: CodePrior | None, x: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """The two-stage bound of preprocessed images x [N,C,H,W] -> [N] float64, nats:
    log p(x | c(x)) + log p(c(x)), c(x) the encoder's codes: the ELBO of the model
    p(c) p(x|c) under the one-hot posterior q(c|x) (whose entropy is 0), so a lower bound on
    log p(x) (docs/architecture-vq.md). With no prior (before the second stage), p(c) is the
    uniform prior of the first stage: log p(c) = -h w log K. A batch at a time, the last one ragged."""
    uniform = -vq.grid_size ** 2 * math.log(vq.config.codebook_size)
    parts = []
    for start in range(0, len(x), batch_size):
        terms = vq(x[start:start + batch_size])
        log_pc = uniform if prior is None else prior.log_prob(terms.indices).double()
        parts.append(log_pc - terms.distortion.double())
    return torch.cat(parts)
