"""Likelihoods p(x|z): what the decoder's output means.

The decoder outputs `params` [B, C * params_per_channel, H, W]: the first C channels are the
location (Bernoulli logits, Gaussian mean, logistic centre), the next C (where there are two)
the log-scale of each pixel. Every likelihood has the same small interface:

  params_per_channel           how many decoder outputs each image channel needs
  log_prob(x, params, mask)    log p(x|z) summed per example -> [B], nats
  mean(params)                 the image the decoder means, in [0, 1], [B,C,H,W]
  nats_to_8bit_per_dim         what converts -log p(x) of x in [0,1] to the 8-bit scale (see bits_per_dim)

Inputs x are float32 in [0, 1]: binary for "bernoulli"; pixel / 255 for the others
(binarization "none"), so the 8-bit value of a pixel is round(x * 255).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian-fixed", "logistic")
LOG_2PI = math.log(2.0 * math.pi)
# The learned log-scale of the Gaussian and the logistic is clamped to [LOG_SCALE_MIN, LOG_SCALE_MAX]:
# below exp(-7), about a quarter of a grey level (1/255 on [0,1]), a density on 8-bit data can grow without bound
# on pixels that never vary (MNIST's black background), and exp(2) is far wider than the data.
LOG_SCALE_MIN, LOG_SCALE_MAX = -7.0, 2.0


def _masked_sum(log_p: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B,C,H,W] -> [B]; with a boolean `mask` (broadcastable), only the pixels where it is True count."""
    if mask is not None:
        log_p = log_p * mask
    return log_p.flatten(1).sum(dim=1)


def _loc_log_scale(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,2C,H,W] -> (location, clamped log-scale), each [B,C,H,W] in float32."""
    loc, log_scale = params.float().chunk(2, dim=1)
    return loc, log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)


class Bernoulli:
    """Binary pixels: p(x=1|z) = sigmoid(logits). The seed's likelihood."""

    params_per_channel = 1
    nats_to_8bit_per_dim = None    # a likelihood of binary images: there is no 8-bit scale

    @staticmethod
    def log_prob(x: torch.Tensor, params: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        ce = F.binary_cross_entropy_with_logits(params.float(), x.float(), reduction="none")
        return -_masked_sum(ce, mask)

    @staticmethod
    def mean(params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)


@dataclass(frozen=True)
class Gaussian:
    """A continuous density on x in [0, 1]: N(x; mean, scale^2) per pixel, normalising constant
    -log(scale * sqrt(2 pi)) included. The scale is the decoder's (`fixed_scale` None: 2 outputs
    per channel, log-scale clamped as above) or a constant (`fixed_scale`: 1 output per channel).

    A density on [0, 1] is 255 times one on [0, 255]: -log p on the 8-bit scale is -log p(x) +
    D ln 255 for D pixels (nats_to_8bit_per_dim). With no dequantisation noise this is the density
    at the grey level, not the probability of its bin: close to it while the scale is a grey level
    or more, and not a bound on the 8-bit NLL."""

    fixed_scale: float | None = None
    nats_to_8bit_per_dim = math.log(255.0)

    @property
    def params_per_channel(self) -> int:
        return 1 if self.fixed_scale else 2

    def _mean_log_scale(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fixed_scale:
            return params.float(), torch.full_like(params, math.log(self.fixed_scale), dtype=torch.float32)
        return _loc_log_scale(params)

    def log_prob(self, x: torch.Tensor, params: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mean, log_scale = self._mean_log_scale(params)
        log_p = -0.5 * ((x.float() - mean) * torch.exp(-log_scale)) ** 2 - log_scale - 0.5 * LOG_2PI
        return _masked_sum(log_p, mask)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return self._mean_log_scale(params)[0].clamp(0, 1)


class DiscretizedLogistic:
    """8-bit pixels: a logistic (centre mu, log-scale s per pixel) integrated over each of the 256
    bins of width 1/255 around the grey levels k/255 (Salimans et al. 2017, PixelCNN++), the two
    end bins taking the tails: P(0) = sigmoid((1/510 - mu) / s), P(255) = 1 - sigmoid((1 - 1/510 - mu) / s).
    A single logistic per pixel, not PixelCNN++'s mixture. The probabilities sum to 1, so the
    log-likelihood is the 8-bit one: bits/dim need no offset."""

    params_per_channel = 2
    nats_to_8bit_per_dim = 0.0
    HALF_BIN = 0.5 / 255

    @classmethod
    def log_prob(cls, x: torch.Tensor, params: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mu, log_scale = _loc_log_scale(params)
        x = torch.round(x.float() * 255) / 255                  # the grey level, exactly on its bin's centre
        inv_scale = torch.exp(-log_scale)
        upper = (x + cls.HALF_BIN - mu) * inv_scale              # [B,C,H,W] standardised bin edges
        lower = (x - cls.HALF_BIN - mu) * inv_scale
        # log(sigmoid(u) - sigmoid(l)) = u - softplus(u) - softplus(l) + log(1 - exp(l - u)): exact, and
        # stable far in either tail, where the difference of two sigmoids would round to 0
        log_bin = upper - F.softplus(upper) - F.softplus(lower) + torch.log(-torch.expm1(lower - upper))
        log_first = -F.softplus(-upper)                          # log sigmoid(u): the bin of 0 and all below
        log_last = -F.softplus(lower)                            # log (1 - sigmoid(l)): 255 and all above
        log_p = torch.where(x < cls.HALF_BIN, log_first, torch.where(x > 1 - cls.HALF_BIN, log_last, log_bin))
        return _masked_sum(log_p, mask)

    @staticmethod
    def mean(params: torch.Tensor) -> torch.Tensor:
        """The logistic's centre (its mode and, before clipping to [0, 1], its mean)."""
        return _loc_log_scale(params)[0].clamp(0, 1)


def get_likelihood(name: str, fixed_scale: float = 0.1):
    """The likelihood called `name` (one of LIKELIHOODS); `fixed_scale` is gaussian-fixed's scale on [0, 1]."""
    return {"bernoulli": Bernoulli, "gaussian": Gaussian(), "gaussian-fixed": Gaussian(fixed_scale),
            "logistic": DiscretizedLogistic}[name]


def log_prob_of_draws(likelihood, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """log p(x|z_k) of K draws per example: images x [B,C,H,W], the decoder's outputs for them
    params [K,B,C*P,H,W] -> [K,B], nats."""
    k = params.shape[0]
    return likelihood.log_prob(x.expand(k, *x.shape).flatten(0, 1), params.flatten(0, 1)).view(k, -1)


def bits_per_dim(nll_nats: float, dims: int, likelihood) -> float:
    """A negative log-likelihood in nats per image of `dims` = C*H*W values in [0, 1] -> bits per
    value on the 8-bit scale: (nll + dims * nats_to_8bit_per_dim) / (dims * ln 2). Exact for the
    discretized logistic; for the Gaussian the density's change of scale (see Gaussian)."""
    return (nll_nats + dims * likelihood.nats_to_8bit_per_dim) / (dims * math.log(2.0))
