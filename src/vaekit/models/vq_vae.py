"""The VQ-VAE family (van den Oord et al. 2017): discrete codes on a grid, a codebook learned by
exponential moving averages, and (code_prior.py) an autoregressive prior over the grid.

Encoder: x [B,C,H,W] -> Conv(hidden/2,4,s2) ReLU [B,hidden/2,H/2,W/2] -> Conv(hidden,4,s2) ReLU
         [B,hidden,H/4,W/4] -> Conv(hidden,3) -> res_blocks x ResBlock -> ReLU -> Conv(code_dim,1)
         -> z_e [B,D,h,w], h = H/4 (7x7 for MNIST).
Quantiser: each z_e vector -> its nearest codebook vector e_k (squared distance); indices [B,h,w].
Decoder: z_q [B,D,h,w] -> Conv(hidden,3) -> res_blocks x ResBlock -> ReLU -> ConvT(hidden/2,4,s2)
         ReLU -> ConvT(C*P,4,s2) -> the likelihood's parameters [B,C*P,H,W] (likelihoods.py), so
         the distortion -log p(x|codes) is in nats, as the Gaussian families' is.

Training (`vq_train_step`, or `vq_loss` then `update_codebook` in a loop of its own): the
gradient of the distortion reaches the encoder through the straight-through estimator (z_q's gradient is given to z_e), plus the commitment loss
beta * ||z_e - sg(z_q)||^2 (beta 0.25). The codebook is not a parameter: it is the EMA recipe
of VQ-VAE-2 (Razavi et al. 2019), with cluster sizes N_k and sums m_k kept as buffers
  N_k <- decay N_k + (1 - decay) n_k,   m_k <- decay m_k + (1 - decay) sum_{z_e -> k} z_e,
  e_k = m_k / N~_k,   N~_k = (N_k + eps) / (n + K eps) * n,   n = sum_k N_k   (Laplace smoothing),
so checkpoints and exact resume carry it. A code that no encoder output chose for `dead_after`
steps is restarted at an encoder output of the current batch, drawn from the caller's generator
(the restart is reproducible and resumable). Every code starts dead, so the first step
initialises the codebook from the data (the codes the random start already fits excepted).

Under DDP (an initialised torch.distributed group of more than one rank) `update_codebook` sums
the batch's counts and sums over ranks, and restarts draw among the encoder outputs of all
ranks, gathered in rank order, from a generator in the same state on every rank: every rank's
codebook stays identical and equals one process's on the global batch (up to float summation
order), and its usage describes the global batch.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .model_config import ModelConfig

EMA_EPSILON = 1e-5      # Laplace smoothing of the cluster sizes (Sonnet's VectorQuantizerEMA)


class ResBlock(nn.Module):
    """x + Conv1x1(ReLU(Conv3x3(ReLU(x)))), the VQ-VAE paper's residual block; [B,C,h,w] -> same."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Quantized(NamedTuple):
    z_q: torch.Tensor         # [B,D,h,w] the codebook vectors, with z_e's gradient (straight-through)
    indices: torch.Tensor     # [B,h,w] int64, the nearest code of each position
    commitment: torch.Tensor  # [B] beta * sum over positions and dims of (z_e - sg(z_q))^2


class VQTerms(NamedTuple):
    """One training pass over x, per example."""
    params: torch.Tensor      # [B,C*P,H,W] the decoder's output
    distortion: torch.Tensor  # [B] -log p(x | codes), nats
    commitment: torch.Tensor  # [B] the commitment loss (not nats: a penalty)
    indices: torch.Tensor     # [B,h,w] int64
    z_e: torch.Tensor         # [B,D,h,w] float32, the encoder's output (for the codebook's update)


class Codebook(nn.Module):
    """K vectors of D dimensions, all buffers (no gradient): the EMA recipe in the module docstring."""

    def __init__(self, size: int, dim: int, decay: float, dead_after: int) -> None:
        super().__init__()
        self.decay, self.dead_after = decay, dead_after
        embedding = torch.randn(size, dim)
        self.register_buffer("embedding", embedding)                            # [K,D] e_k
        # one pseudo-observation at the random start: e_k = m_k / N_k holds from the first step
        self.register_buffer("cluster_size", torch.ones(size))                  # [K] N_k
        self.register_buffer("embed_sum", embedding.clone())                    # [K,D] m_k
        self.register_buffer("unused_steps", torch.full((size,), dead_after))   # [K] int64, steps since chosen
        self.register_buffer("epoch_counts", torch.zeros(size))                 # [K] choices this epoch
        self.register_buffer("epoch_restarts", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.embedding.shape[0]

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Vectors z [N,D] -> the index of the nearest codebook vector of each [N], by
        ||z||^2 - 2 z.e + ||e||^2: a [N,K] matrix, not [N,K,D], in float32 even under autocast
        (a bf16 product would pick another code for close pairs)."""
        with torch.autocast(z.device.type, enabled=False):
            z, e = z.float(), self.embedding.float()
            distance = (z * z).sum(1, keepdim=True) - 2 * z @ e.T + (e * e).sum(1)    # [N,K]
        return distance.argmin(1)

    def batch_statistics(self, z: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder outputs z [N,D] and their codes [N] -> (n_k [K], sum of the z of each code [K,D]),
        float32. Under DDP, update_codebook sums both over ranks before `update`."""
        with torch.autocast(z.device.type, enabled=False):
            one_hot = F.one_hot(indices, self.size).float()                      # [N,K]
            return one_hot.sum(0), one_hot.T @ z.float()

    @torch.no_grad()
    def update(self, counts: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
        """One EMA step from a batch's statistics (batch_statistics). Returns the codes [R] now
        dead, unused for `dead_after` steps, which `restart` must move."""
        keep = self.decay
        self.cluster_size.mul_(keep).add_(counts, alpha=1 - keep)
        self.embed_sum.mul_(keep).add_(sums, alpha=1 - keep)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + EMA_EPSILON) / (n + self.size * EMA_EPSILON) * n     # [K]
        self.embedding.copy_(self.embed_sum / smoothed[:, None])
        self.epoch_counts.add_(counts)
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        return torch.nonzero(self.unused_steps >= self.dead_after).flatten()                 # [R]

    @torch.no_grad()
    def restart(self, dead: torch.Tensor, candidates: torch.Tensor, generator: torch.Generator) -> int:
        """Restarts the codes `dead` [R] at encoder outputs drawn (with replacement, from
        `generator`) among `candidates` [N,D]. Returns R."""
        pick = torch.randint(len(candidates), (len(dead),), generator=generator, device=generator.device)
        fresh = candidates[pick.to(candidates.device)].float()                                # [R,D]
        self.embedding[dead] = fresh
        self.embed_sum[dead] = fresh
        self.cluster_size[dead] = 1.0
        self.unused_steps[dead] = 0
        self.epoch_restarts.add_(len(dead))
        return len(dead)

    def start_epoch(self) -> None:
        """Zeroes the usage counted for `codebook_usage`; the training loop calls it as each epoch begins."""
        self.epoch_counts.zero_()
        self.epoch_restarts.zero_()


class VQVAE(nn.Module):
    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        config = config or ModelConfig(family="vq")
        self.config = config
        self.likelihood = config.likelihood_fn
        hidden, half = config.hidden_channels, config.hidden_channels // 2
        self.encoder = nn.Sequential(
            nn.Conv2d(config.image_channels, half, 4, stride=2, padding=1), nn.ReLU(),   # [B,hidden/2,H/2,W/2]
            nn.Conv2d(half, hidden, 4, stride=2, padding=1), nn.ReLU(),                  # [B,hidden,h,w]
            nn.Conv2d(hidden, hidden, 3, padding=1),
            *[ResBlock(hidden) for _ in range(config.res_blocks)], nn.ReLU(),
            nn.Conv2d(hidden, config.code_dim, 1))                                        # [B,D,h,w]
        self.codebook = Codebook(config.codebook_size, config.code_dim, config.ema_decay, config.dead_after)
        self.decoder = nn.Sequential(
            nn.Conv2d(config.code_dim, hidden, 3, padding=1),
            *[ResBlock(hidden) for _ in range(config.res_blocks)], nn.ReLU(),
            nn.ConvTranspose2d(hidden, half, 4, stride=2, padding=1), nn.ReLU(),          # [B,hidden/2,H/2,W/2]
            nn.ConvTranspose2d(half, config.output_channels, 4, stride=2, padding=1))     # [B,C*P,H,W]

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,C,H,W] -> z_e [B,D,h,w], float32 (even under autocast)."""
        return self.encoder(x).float()

    def quantize(self, z_e: torch.Tensor) -> Quantized:
        """z_e [B,D,h,w] -> its nearest codebook vectors (with z_e's gradient: straight-through),
        their indices and the commitment loss of each example."""
        b, d, h, w = z_e.shape
        indices = self.codebook.nearest(z_e.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)
        z_q = self.lookup(indices)
        commitment = self.config.commitment * (z_e - z_q.detach()).pow(2).flatten(1).sum(1)
        # straight-through: the value is z_q exactly (z_e - z_e is 0), the gradient z_e's
        return Quantized(z_q + (z_e - z_e.detach()), indices, commitment)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes [B,h,w] -> their codebook vectors [B,D,h,w]."""
        return self.codebook.embedding[indices].permute(0, 3, 1, 2)

    def decode(self, z_q: torch.Tensor, as_image: bool = False) -> torch.Tensor:
        """[B,D,h,w] -> the likelihood's parameters [B,C*P,H,W] (Bernoulli: logits), or with
        `as_image` the image they mean, [B,C,H,W] in [0,1]."""
        params = self.decoder(z_q)
        return self.likelihood.mean(params) if as_image else params

    def decode_indices(self, indices: torch.Tensor, as_image: bool = False) -> torch.Tensor:
        """Codes [B,h,w] (int64) -> the likelihood's parameters (or the image), as `decode`."""
        return self.decode(self.lookup(indices), as_image)

    def forward(self, x: torch.Tensor) -> VQTerms:
        """One pass of preprocessed images x [B,C,H,W]: what a training step and the bound need.
        Changes nothing: the codebook's update is `vq_train_step`'s."""
        z_e = self.encode(x)
        quantized = self.quantize(z_e)
        params = self.decode(quantized.z_q)
        distortion = -self.likelihood.log_prob(x, params)
        return VQTerms(params, distortion, quantized.commitment, quantized.indices, z_e)

    @torch.inference_mode()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images x [B,C,H,W] -> their reconstructions [B,C,H,W] in [0,1]: the decode
        of their codes (deterministic)."""
        return self.decode(self.quantize(self.encode(x)).z_q, as_image=True)

    @torch.no_grad()
    def codes(self, x: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
        """The codes [N,h,w] of preprocessed images x [N,C,H,W], a batch at a time: the prior's
        training data (no_grad, not inference_mode, so that the prior's backward may save them)."""
        return torch.cat([self.quantize(self.encode(x[i:i + batch_size])).indices
                          for i in range(0, len(x), batch_size)])

    def unknown_codes(self, observed: torch.Tensor) -> torch.Tensor:
        """A pixel mask [B,1 or C,H,W] (True: observed) -> [B,h,w] True at every code whose
        receptive field holds an unobserved pixel: the codes inpainting must draw. The field is
        propagated through each of the encoder's convolutions in turn (a max-pool of the same
        kernel, stride and padding), which is exact for this chain of convolutions, whose
        residual shortcuts see no further than their 3x3 branch."""
        hidden = (~observed.bool()).any(1, keepdim=True).float()                 # [B,1,H,W]
        for layer in self.encoder.modules():
            if isinstance(layer, nn.Conv2d):
                hidden = F.max_pool2d(hidden, layer.kernel_size, layer.stride, layer.padding)
        return hidden[:, 0] > 0


def vq_loss(terms: VQTerms) -> torch.Tensor:
    """The first stage's training loss of each example, [B]: distortion (nats) + commitment."""
    return terms.distortion + terms.commitment


def update_codebook(model: VQVAE, terms: VQTerms, generator: torch.Generator) -> tuple[int, torch.Tensor]:
    """The codebook's step after the optimizer's, from the pass `terms`: the EMA update from
    its encoder outputs and codes, then the restarts (drawn from `generator`). Under DDP the
    statistics are summed over ranks and the restarts drawn among all ranks' encoder outputs,
    so `generator` must be in the same state on every rank. Returns the codes restarted and the
    batch's code counts [K] (the global batch's under DDP)."""
    d = terms.z_e.shape[1]
    z = terms.z_e.detach().permute(0, 2, 3, 1).reshape(-1, d)                  # [b*h*w,D] this rank's
    book = model.codebook
    counts, sums = book.batch_statistics(z, terms.indices.flatten())            # [K], [K,D]
    across_ranks = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if across_ranks:
        dist.all_reduce(counts)
        dist.all_reduce(sums)
    dead = book.update(counts, sums)                                             # the same on every rank
    if len(dead) == 0:
        return 0, counts
    return book.restart(dead, _rows_of_all_ranks(z) if across_ranks else z, generator), counts


def _rows_of_all_ranks(z: torch.Tensor) -> torch.Tensor:
    """Every rank's rows z [n_r,D] -> [sum of n_r, D], in rank order, on every rank: the global
    batch's rows in one process's order (ranks hold contiguous shares, Runtime.shard). Shares
    may differ by a row, so each is padded to the largest for all_gather."""
    world = dist.get_world_size()
    size = torch.tensor([len(z)], device=z.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(n) for n in sizes]
    padded = z.new_zeros(max(sizes), z.shape[1])                                 # [max n_r,D]
    padded[:len(z)] = z
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def vq_train_step(model: VQVAE, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                  generator: torch.Generator) -> dict[str, float]:
    """One step of the first stage on preprocessed images x [B,C,H,W]: the gradient step of the
    batch mean of `vq_loss` (encoder and decoder), then `update_codebook`. Returns the batch's
    means (distortion in nats), the codes restarted and the perplexity of the batch's codes."""
    model.train()
    terms = model(x)
    loss = vq_loss(terms).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    restarted, counts = update_codebook(model, terms, generator)
    return {"loss": loss.item(), "distortion": terms.distortion.detach().mean().item(),
            "commitment": terms.commitment.detach().mean().item(), "restarted": restarted,
            "perplexity": perplexity(counts)}


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of the code frequencies `counts` [K]: the number of equally used codes that
    would give the same entropy (K at most); 0 before any count."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts / total
    return math.exp(-(p * torch.log(p.clamp_min(1e-30))).sum().item())


def codebook_usage(model: VQVAE) -> dict[str, float | int]:
    """The codebook's use since the epoch began (Codebook.start_epoch): the perplexity of the
    codes chosen, the codes never chosen ("dead_codes") and the codes restarted."""
    book = model.codebook
    return {"perplexity": perplexity(book.epoch_counts), "dead_codes": int((book.epoch_counts == 0).sum()),
            "restarts": int(book.epoch_restarts)}
