"""Each likelihood against an independent implementation (torch.distributions, or the logistic
CDF in float64 NumPy), and the invariants that make them likelihoods."""
import math

import numpy as np
import pytest
import torch

from vaekit.likelihoods import Bernoulli, DiscretizedLogistic, Gaussian, bits_per_dim, get_likelihood


def grey_batch(seed=0, shape=(4, 3, 5, 5)):
    """Grey levels k/255, with some pixels at the two end bins."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, shape, generator=g).double()
    x[:, :, 0, 0], x[:, :, 0, 1] = 0, 255
    return x / 255


def test_bernoulli_is_torch_distributions_bernoulli():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (4, 1, 6, 6), generator=g).float()
    logits = torch.randn(4, 1, 6, 6, generator=g) * 3
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(Bernoulli.log_prob(x, logits), expected)
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[:, :3] = True
    torch.testing.assert_close(Bernoulli.log_prob(x, logits, mask),
                               (torch.distributions.Bernoulli(logits=logits).log_prob(x) * mask).flatten(1).sum(1))


@pytest.mark.parametrize("learned", [True, False])
def test_gaussian_is_torch_distributions_normal_with_its_normalising_constant(learned):
    g = torch.Generator().manual_seed(1)
    x = grey_batch().float()
    mean = torch.rand(x.shape, generator=g)
    if learned:
        log_scale = torch.rand(x.shape, generator=g) * 4 - 5          # within the clamp
        likelihood, params = Gaussian(), torch.cat([mean, log_scale], dim=1)
        scale = log_scale.exp()
    else:
        likelihood, params, scale = Gaussian(fixed_scale=0.2), mean, torch.full(x.shape, 0.2)
    assert params.shape[1] == x.shape[1] * likelihood.params_per_channel
    expected = torch.distributions.Normal(mean, scale).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(likelihood.log_prob(x, params), expected)


def np_discretized_logistic(x, mu, log_s):
    """log P(grey level round(255 x)) under a logistic integrated over its bin, float64 NumPy: a
    difference of CDFs below the centre, of survival functions above it (no cancellation in the tails)."""
    cdf = lambda t: 1 / (1 + np.exp(-(t - mu) / np.exp(log_s)))  # noqa: E731
    sf = lambda t: 1 / (1 + np.exp((t - mu) / np.exp(log_s)))   # noqa: E731
    half = 0.5 / 255
    below = np.where(x > 1 - half, 1.0, cdf(x + half)) - np.where(x < half, 0.0, cdf(x - half))
    above = np.where(x < half, 1.0, sf(x - half)) - np.where(x > 1 - half, 0.0, sf(x + half))
    return np.log(np.where(x > mu, above, below))


def test_discretized_logistic_matches_numpy():
    g = torch.Generator().manual_seed(2)
    x = grey_batch()
    mu, log_s = torch.rand(x.shape, generator=g, dtype=torch.float64), -torch.rand(x.shape, generator=g,
                                                                                  dtype=torch.float64) * 3 - 1
    expected = np_discretized_logistic(x.numpy(), mu.numpy(), log_s.numpy()).reshape(len(x), -1).sum(1)
    got = DiscretizedLogistic.log_prob(x.float(), torch.cat([mu, log_s], dim=1).float())
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-4)


@pytest.mark.parametrize("mu, log_s", [(0.5, -3.0), (0.0, -5.0), (1.0, -6.5), (0.3, 1.5), (3.0, -2.0)])
def test_discretized_logistic_sums_to_one_over_the_256_levels(mu, log_s):
    """Also far in a tail (mu 3.0 puts nearly all the mass in the 255 bin) and for sharp logistics."""
    x = (torch.arange(256, dtype=torch.float32) / 255).view(256, 1, 1, 1)
    params = torch.tensor([mu, log_s]).view(1, 2, 1, 1).expand(256, 2, 1, 1)
    log_p = DiscretizedLogistic.log_prob(x, params)
    assert torch.isfinite(log_p).all()
    assert abs(torch.logsumexp(log_p.double(), 0).item()) < 1e-5


def test_means_are_images():
    params = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(3)) * 3
    for name in ("bernoulli", "gaussian", "gaussian-fixed", "logistic"):
        likelihood = get_likelihood(name)
        image = likelihood.mean(params[:, :3 * likelihood.params_per_channel])
        assert image.shape == (2, 3, 4, 4) and image.min() >= 0 and image.max() <= 1


def test_bits_per_dim_on_the_8_bit_scale():
    dims = 3 * 32 * 32
    assert bits_per_dim(dims * math.log(2), dims, DiscretizedLogistic) == pytest.approx(1.0)
    # a density on [0,1] is 255 times one on [0,255]: density 1 on [0,1] is log2(255) bits per value
    assert bits_per_dim(0.0, dims, Gaussian()) == pytest.approx(math.log2(255))
