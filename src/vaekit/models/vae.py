"""What every model family shares: q(z|x), the prior p(z) and p(x|z) around an encoder and a decoder.

A one-layer family (conv_vae.py, resnet_vae.py) builds two networks and passes them here:
  encoder: [B, C + classes, H, W] -> [B, 2 * latent]       (mean and log-variance of q(z|x))
  decoder: [B, latent + classes] -> [B, C * P, H, W]       (the likelihood's P parameters per channel)
A class-conditional model (config.conditional) sees the one-hot label [B, classes] as extra
constant input channels of the encoder and beside z at the decoder; `classes` is 0 otherwise.
The hierarchical family (ladder_vae.py) overrides the passes that its layers of z change.

The prior is N(0, I) (the seed's), or with config.prior "vamp" the VampPrior (Tomczak & Welling
2018): p(z) = (1/M) sum_m q(z | u_m), a mixture of the posteriors of M learned pseudo-inputs u_m.

`forward` is the one pass training and evaluation share: it returns the `Terms` of each example
(log p(x|z), log p(z), log q(z|x) and the rate of each stochastic layer), from which the ELBO,
the IWAE bound and every training objective are sums (see objectives.py).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..likelihoods import log_prob_of_draws
from ..objectives import analytic_kl, log_normal_pdf
from .model_config import ModelConfig

PSEUDO_INPUT_INIT = (0.05, 0.01)   # Tomczak & Welling's N(mean, std) start of the pseudo-inputs, kept in [0, 1]


class Terms(NamedTuple):
    """One pass over x with given noise, per example ([..., B]: a leading K for K draws each)."""
    params: torch.Tensor     # the decoder's output, [..., B, C*P, H, W]
    log_px: torch.Tensor     # log p(x|z)
    log_pz: torch.Tensor     # log p(z), all stochastic layers at the drawn codes
    log_qz: torch.Tensor     # log q(z|x), the same
    rate: torch.Tensor       # [..., B, L] each layer's KL(q || p): in closed form where there is one
                             # (Gaussian against Gaussian), else log q - log p of the draw

    @property
    def log_w(self) -> torch.Tensor:
        """The importance weight log p(x, z) - log q(z|x): the single-sample ELBO, or with K
        draws the terms of the IWAE bound."""
        return self.log_px + self.log_pz - self.log_qz


class VAE(nn.Module):
    # The precision ("fp32" or "bf16") a copy made by models.inference.prepare_for_inference runs
    # in by itself; None for the model as training builds it, which runs in its caller's autocast.
    inference_precision: str | None = None

    def __init__(self, config: ModelConfig, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        if config.conditional and not config.num_classes:
            raise ValueError("a conditional model needs num_classes (training sets it from the data)")
        self.config = config
        self.likelihood = config.likelihood_fn
        self.encoder = encoder
        self.decoder = decoder
        self.pseudo_inputs = None
        self.frozen_prior = None    # the VampPrior's components computed once, for inference (freeze_prior)
        if config.prior == "vamp":
            shape = (config.pseudo_inputs, config.image_channels, config.image_size, config.image_size)
            self.pseudo_inputs = nn.Parameter(torch.randn(shape) * PSEUDO_INPUT_INIT[1] + PSEUDO_INPUT_INIT[0])

    @property
    def latent_dim(self) -> int:
        """The dimensions of the code the tools see: z, or a hierarchy's top layer."""
        return self.config.latent_dim

    @property
    def noise_dim(self) -> int:
        """Standard-normal draws one pass takes per example: latent_dim per stochastic layer."""
        return self.config.latent_dim * self.config.layers_of_z

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

    @torch.inference_mode()
    def posterior(self, x: torch.Tensor, batch_size: int = 2000,
                  y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of q(z|x), each [N,latent], for preprocessed images x [N,C,H,W] (and their
        labels y [N], for a conditional model), a batch at a time (the last one ragged, never dropped)."""
        parts = [self.encode(x[i:i + batch_size], None if y is None else y[i:i + batch_size])
                 for i in range(0, len(x), batch_size)]
        return torch.cat([m for m, _ in parts]), torch.cat([v for _, v in parts])

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

    # -- the prior --------------------------------------------------------------------------
    def prior_components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The VampPrior's mixture components: q(z|u_m) of each pseudo-input, (mean, logvar) [M,latent]."""
        if self.frozen_prior is not None:
            return self.frozen_prior
        return self.encode(self.pseudo_inputs.clamp(0, 1))    # hardtanh: pseudo-inputs stay images

    def freeze_prior(self) -> None:
        """Computes the VampPrior's components once, for a model that no longer trains: inference
        then pays for M encodes once, not once per batch."""
        if self.pseudo_inputs is not None:
            self.frozen_prior = tuple(t.detach() for t in self.prior_components())

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) of codes [..., latent] -> [...]."""
        if self.pseudo_inputs is None:
            return log_normal_pdf(z, 0.0, 0.0)
        mean, logvar = self.prior_components()
        return mixture_log_pdf(z, mean, logvar)

    def prior_codes(self, eps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Codes of the prior from standard-normal draws eps [n,latent]: eps itself under N(0, I);
        under the VampPrior, component m's mean + its scale * eps, m drawn from `generator` (or,
        with no generator, row i's m spread evenly over the M components: fixed codes, as the
        progress grid's, stay fixed)."""
        if self.pseudo_inputs is None:
            return eps
        mean, logvar = self.prior_components()
        m = len(mean)
        if generator is None:
            pick = torch.arange(len(eps), device=eps.device) * m // max(len(eps), 1)
        else:
            pick = torch.randint(m, (len(eps),), generator=generator, device=generator.device).to(eps.device)
        return self.reparameterize(mean[pick], logvar[pick], eps=eps)

    def layer_rate(self, mean: torch.Tensor, logvar: torch.Tensor, log_qz: torch.Tensor,
                   log_pz: torch.Tensor) -> torch.Tensor:
        """The rate of the layer the prior is for: analytic KL under N(0, I), else log q - log p."""
        return analytic_kl(mean, logvar).expand(log_qz.shape) if self.pseudo_inputs is None else log_qz - log_pz

    # -- the passes ---------------------------------------------------------------------------
    def decode_prior(self, eps: torch.Tensor | None = None, n: int = 100, generator: torch.Generator | None = None,
               y: torch.Tensor | None = None) -> torch.Tensor:
        """Decodes prior draws (or the codes the standard-normal draws `eps` [n,noise_dim] make,
        see prior_codes) to images [n,C,H,W] in [0,1]."""
        if eps is None:
            device = next(self.parameters()).device
            eps = torch.randn(n, self.noise_dim, generator=generator, device=device)
        return self.decode(self.prior_codes(eps, generator), y, as_image=True)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, eps: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> Terms:
        """One pass with z ~ q(z|x): its Terms per example. `eps` [B,noise_dim]: the
        reparameterization noise, when the caller draws it (else drawn from `generator`); with
        eps [K,B,noise_dim], K draws per image (the IWAE bound), every term then [K,B]."""
        mean, logvar = self.encode(x, y)
        z = self.reparameterize(mean, logvar, generator, eps)
        if z.dim() == 2:
            params = self.decode(z, y)
            log_px = self.likelihood.log_prob(x, params)
        else:
            k = z.shape[0]
            params = self.decode(z.flatten(0, 1), None if y is None else y.repeat(k)).unflatten(0, (k, len(x)))
            log_px = log_prob_of_draws(self.likelihood, x, params)
        log_pz, log_qz = self.log_prior(z), log_normal_pdf(z, mean, logvar)
        return Terms(params, log_px, log_pz, log_qz, self.layer_rate(mean, logvar, log_qz, log_pz)[..., None])


def mixture_log_pdf(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log (1/M) sum_m N(z; mean_m, exp(logvar_m)) of codes z [..., D] under M diagonal Gaussians
    (mean, logvar [M,D]) -> [...]. Expanded into matrix products, (z-m)^2/v = z^2/v - 2 z m/v + m^2/v,
    so memory is [N,M], not [N,M,D]; in fp32 under any autocast (the terms cancel: in bf16 they
    would lose nats)."""
    shape, z = z.shape[:-1], z.reshape(-1, z.shape[-1])
    precision = torch.exp(-logvar)                                                   # [M,D]
    with torch.autocast(z.device.type, enabled=False):
        quad = (z * z) @ precision.T - 2 * z @ (mean * precision).T + (mean * mean * precision).sum(1)   # [N,M]
    log_n = -0.5 * (quad + logvar.sum(1) + z.shape[-1] * math.log(2 * math.pi))
    return (torch.logsumexp(log_n, dim=1) - math.log(len(mean))).view(shape)
