"""ELBO estimators and the IWAE bound, as pure tensor functions.

Every function returns one value per example ([B], in nats); callers sum or average. The
ELBO's two parts are kept apart: distortion = -log p(x|z), rate = KL(q(z|x) || p(z)).
`params` is the decoder's output and `likelihood` says what it means (see likelihoods.py;
the seed's Bernoulli by default).
"""
from __future__ import annotations

import math

import torch

from .likelihoods import Bernoulli

LOG_2PI = math.log(2.0 * math.pi)


def log_normal_pdf(sample: torch.Tensor, mean, logvar) -> torch.Tensor:
    """log N(sample; mean, exp(logvar)) summed over the last dim: [B,D] -> [B]. The seed's formula."""
    mean = torch.as_tensor(mean, dtype=sample.dtype, device=sample.device)
    logvar = torch.as_tensor(logvar, dtype=sample.dtype, device=sample.device)
    return torch.sum(-0.5 * ((sample - mean) ** 2 * torch.exp(-logvar) + logvar + LOG_2PI), dim=-1)


def analytic_kl_per_dim(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_d, exp(logvar_d)) || N(0, 1)) for each latent dimension: [B,D] -> [B,D]."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def analytic_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) in closed form: [B,D] -> [B]."""
    return analytic_kl_per_dim(mean, logvar).sum(dim=-1)


def single_sample_elbo(x, params, z, mean, logvar, likelihood=Bernoulli, beta: float = 1.0) -> torch.Tensor:
    """The seed's `compute_loss` estimator, per example [B]:
    log p(x|z) + log p(z) - log q(z|x) with one z ~ q(z|x). Its batch mean, negated, is the loss.

    With `beta` != 1 the beta-VAE objective log p(x|z) - beta (log q(z|x) - log p(z)), which is
    no bound on log p(x); at beta = 1 it is the ELBO bit for bit (multiplying by 1.0 is exact)."""
    return likelihood.log_prob(x, params) + beta * log_normal_pdf(z, 0.0, 0.0) - beta * log_normal_pdf(z, mean, logvar)


def analytic_elbo_terms(x, params, mean, logvar, likelihood=Bernoulli) -> tuple[torch.Tensor, torch.Tensor]:
    """(distortion, rate) per example [B]: -log p(x|z) with one z ~ q, and the closed-form KL."""
    return -likelihood.log_prob(x, params), analytic_kl(mean, logvar)


def importance_weights(x, params, z, mean, logvar, likelihood=Bernoulli) -> torch.Tensor:
    """log w = log p(x|z) + log p(z) - log q(z|x) for K draws per example.

    x [B,...]; params [K,B,...]; z, mean, logvar broadcastable to [K,B,D]. Returns [K,B]."""
    k = params.shape[0]
    log_px_z = likelihood.log_prob(x.expand(k, *x.shape).flatten(0, 1), params.flatten(0, 1)).view(k, -1)
    return log_px_z + log_normal_pdf(z, 0.0, 0.0) - log_normal_pdf(z, mean, logvar)


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """log (1/K) sum_k w_k from log weights [K,B] -> [B], stable through logsumexp."""
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])
