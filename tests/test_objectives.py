"""The losses against an independent float64 NumPy implementation of the seed's formulas."""
import math

import numpy as np
import torch

from vaekit.likelihoods import Bernoulli
from vaekit.objectives import analytic_kl, importance_weights, iwae_bound, log_normal_pdf, single_sample_elbo


def np_log_normal_pdf(sample, mean, logvar):
    log2pi = np.log(2.0 * np.pi)
    return np.sum(-0.5 * ((sample - mean) ** 2.0 * np.exp(-logvar) + logvar + log2pi), axis=1)


def np_sigmoid_cross_entropy_with_logits(logits, labels):
    # TF's numerically stable form: max(x, 0) - x * z + log(1 + exp(-|x|))
    return np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))


def np_seed_elbo(x, logits, z, mean, logvar):
    logpx_z = -np_sigmoid_cross_entropy_with_logits(logits, x).reshape(len(x), -1).sum(axis=1)
    return logpx_z + np_log_normal_pdf(z, 0.0, 0.0) - np_log_normal_pdf(z, mean, logvar)


def random_batch(rng, b=7, latent=5):
    x = (rng.random((b, 1, 28, 28)) > 0.6).astype(np.float64)
    logits = rng.normal(0, 4, size=(b, 1, 28, 28))
    mean, logvar = rng.normal(size=(b, latent)), rng.normal(0, 0.8, size=(b, latent))
    z = mean + np.exp(logvar / 2) * rng.normal(size=(b, latent))
    return x, logits, z, mean, logvar


def test_single_sample_elbo_matches_numpy():
    rng = np.random.default_rng(0)
    arrays = random_batch(rng)
    expected = np_seed_elbo(*arrays)
    got = single_sample_elbo(*map(torch.from_numpy, arrays))
    assert got.shape == (7,)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5)


def test_parts_match_numpy():
    rng = np.random.default_rng(1)
    x, logits, z, mean, logvar = random_batch(rng)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    np.testing.assert_allclose(log_normal_pdf(t(z), t(mean), t(logvar)).numpy(), np_log_normal_pdf(z, mean, logvar))
    np.testing.assert_allclose(Bernoulli.log_prob(t(x), t(logits)).double().numpy(),
                               -np_sigmoid_cross_entropy_with_logits(logits, x).reshape(7, -1).sum(1), rtol=1e-5)
    kl = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1 - logvar, axis=1)
    np.testing.assert_allclose(analytic_kl(t(mean), t(logvar)).numpy(), kl)


def test_analytic_kl_is_expectation_of_log_ratio():
    """E_q[log q(z|x) - log p(z)] estimated with many draws approaches the closed form."""
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64) * 0.5
    z = mean + torch.exp(logvar / 2) * torch.randn(200_000, 3, 4, dtype=torch.float64)
    mc = (log_normal_pdf(z, mean, logvar) - log_normal_pdf(z, 0.0, 0.0)).mean(0)
    torch.testing.assert_close(mc, analytic_kl(mean, logvar), atol=0.02, rtol=0.01)


def test_iwae_bound_with_one_sample_is_the_elbo():
    rng = np.random.default_rng(2)
    x, logits, z, mean, logvar = map(torch.from_numpy, random_batch(rng))
    log_w = importance_weights(x, logits[None], z[None], mean, logvar)
    torch.testing.assert_close(iwae_bound(log_w), single_sample_elbo(x, logits, z, mean, logvar).double(),
                               rtol=1e-5, atol=1e-4)


def test_iwae_bound_is_log_mean_exp():
    log_w = torch.tensor([[0.0, -1000.0], [math.log(3.0), -1001.0]], dtype=torch.float64)
    expected = torch.tensor([math.log(2.0), -1000.0 + math.log((1 + math.exp(-1)) / 2)], dtype=torch.float64)
    torch.testing.assert_close(iwae_bound(log_w), expected)


def test_beta_weights_the_rate_and_beta_one_is_the_elbo_bit_for_bit():
    rng = np.random.default_rng(3)
    x, logits, z, mean, logvar = map(torch.from_numpy, random_batch(rng))
    elbo = single_sample_elbo(x, logits, z, mean, logvar)
    assert torch.equal(single_sample_elbo(x, logits, z, mean, logvar, beta=1.0), elbo)
    log_px = Bernoulli.log_prob(x, logits)
    mc_rate = log_normal_pdf(z, mean, logvar) - log_normal_pdf(z, 0.0, 0.0)
    torch.testing.assert_close(single_sample_elbo(x, logits, z, mean, logvar, beta=4.0), log_px - 4.0 * mc_rate)


def test_iwae_bound_is_at_least_the_mean_elbo_of_its_draws():
    """log mean_k w_k >= mean_k log w_k (Jensen), for every example."""
    rng = np.random.default_rng(4)
    x, _, _, mean, logvar = map(torch.from_numpy, random_batch(rng))
    k = 6
    logits = torch.from_numpy(rng.normal(0, 4, size=(k, *x.shape)))
    z = mean + torch.exp(logvar / 2) * torch.from_numpy(rng.normal(size=(k, *mean.shape)))
    log_w = importance_weights(x, logits, z, mean, logvar)
    assert log_w.shape == (k, 7)
    assert (iwae_bound(log_w) >= log_w.mean(0)).all()
