"""The losses against an independent float64 NumPy implementation of the seed's formulas."""
import math

import numpy as np
import torch

from vaekit.likelihoods import Bernoulli
from vaekit.models import ConvVAE, ModelConfig
from vaekit.models.vae import Terms
from vaekit.objectives import (analytic_kl, gaussian_kl, importance_weights, iwae_bound, log_normal_pdf,
                               log_normal_pdf_of_draw, mean_and_stderr, rate_per_dim, training_loss)


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


def test_a_pass_of_the_seed_model_gives_the_seeds_elbo_as_numpy_computes_it():
    """The model's own pass (encode, reparameterize with the given noise, decode, the terms) against
    the seed's compute_loss in float64 NumPy on that pass's mean, log-variance, z and logits."""
    torch.manual_seed(0)
    model = ConvVAE(ModelConfig(latent_dim=5))
    x = (torch.rand(7, 1, 28, 28) > 0.6).float()
    eps = torch.randn(7, 5)
    with torch.no_grad():
        terms = model(x, eps=eps)
        mean, logvar = model.encode(x)
    z = mean + torch.exp(logvar / 2) * eps
    expected = np_seed_elbo(x.double().numpy(), terms.params.double().numpy(), z.double().numpy(),
                            mean.double().numpy(), logvar.double().numpy())
    assert terms.log_w.shape == (7,)
    np.testing.assert_allclose(terms.log_w.double().numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(terms.rate[:, 0].numpy(), analytic_kl(mean, logvar).numpy(), rtol=1e-6)


def test_parts_match_numpy():
    rng = np.random.default_rng(1)
    x, logits, z, mean, logvar = random_batch(rng)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    np.testing.assert_allclose(log_normal_pdf(t(z), t(mean), t(logvar)).numpy(), np_log_normal_pdf(z, mean, logvar))
    np.testing.assert_allclose(Bernoulli.log_prob(t(x), t(logits)).double().numpy(),
                               -np_sigmoid_cross_entropy_with_logits(logits, x).reshape(7, -1).sum(1), rtol=1e-5)
    kl = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1 - logvar, axis=1)
    np.testing.assert_allclose(analytic_kl(t(mean), t(logvar)).numpy(), kl)


def test_a_grids_densities_sum_over_its_units_in_any_layout_and_a_draws_density_needs_only_its_noise():
    torch.manual_seed(0)
    mean, logvar, noise = (torch.randn(5, 8, 7, 7, dtype=torch.float64) for _ in range(3))
    mean, logvar = mean.to(memory_format=torch.channels_last), logvar.to(memory_format=torch.channels_last)
    z = mean + torch.exp(logvar / 2) * noise
    flat = log_normal_pdf(z.flatten(1), mean.flatten(1), logvar.flatten(1))            # [5], the vector form
    torch.testing.assert_close(log_normal_pdf(z, mean, logvar, dim=(1, 2, 3)), flat)
    torch.testing.assert_close(log_normal_pdf_of_draw(noise, logvar, dim=(1, 2, 3)), flat)
    other_mean, other_logvar = torch.randn(2, 5, 8, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(gaussian_kl(mean, logvar, other_mean, other_logvar, dim=(1, 2, 3)),
                               gaussian_kl(*(t.flatten(1) for t in (mean, logvar, other_mean, other_logvar))))


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
    expected = torch.from_numpy(np_seed_elbo(*(a.numpy() for a in (x, logits, z, mean, logvar))))
    torch.testing.assert_close(iwae_bound(log_w), expected, rtol=1e-5, atol=1e-4)


def test_iwae_bound_is_log_mean_exp():
    log_w = torch.tensor([[0.0, -1000.0], [math.log(3.0), -1001.0]], dtype=torch.float64)
    expected = torch.tensor([math.log(2.0), -1000.0 + math.log((1 + math.exp(-1)) / 2)], dtype=torch.float64)
    torch.testing.assert_close(iwae_bound(log_w), expected)


def terms_of(x, logits, z, mean, logvar) -> Terms:
    log_pz, log_qz = log_normal_pdf(z, 0.0, 0.0), log_normal_pdf(z, mean, logvar)
    return Terms(logits, Bernoulli.log_prob(x, logits), log_pz, log_qz, analytic_kl(mean, logvar)[:, None])


def test_kl_weight_scales_the_rate_and_weight_one_is_the_elbo_bit_for_bit():
    rng = np.random.default_rng(3)
    terms = terms_of(*map(torch.from_numpy, random_batch(rng)))
    assert torch.equal(training_loss(terms, kl_weight=1.0), -terms.log_w)
    mc_rate = terms.log_qz - terms.log_pz
    torch.testing.assert_close(training_loss(terms, kl_weight=4.0), -(terms.log_px - 4.0 * mc_rate))
    torch.testing.assert_close(training_loss(terms, kl_weight=0.5, kl="analytic"),
                               -terms.log_px + 0.5 * terms.rate[:, 0])


def test_free_bits_count_each_layers_rate_as_at_least_their_nats():
    rate = torch.tensor([[0.2, 3.0], [5.0, 0.0]], dtype=torch.float64)
    terms = Terms(None, torch.tensor([-10.0, -20.0], dtype=torch.float64), None, None, rate)
    torch.testing.assert_close(training_loss(terms, kl="analytic", free_bits=1.0),
                               torch.tensor([10.0 + 1.0 + 3.0, 20.0 + 5.0 + 1.0], dtype=torch.float64))


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


def test_posterior_encodes_every_image_once_in_batches_with_a_ragged_last_one():
    """Batches of 3 over 7 images, the last of 1: the same (mean, logvar) as one pass over all 7,
    row for row (a dropped or doubled last image changes the shape and the rows)."""
    torch.manual_seed(0)
    model = ConvVAE(ModelConfig(latent_dim=5))
    x = (torch.rand(7, 1, 28, 28) > 0.6).float()
    with torch.inference_mode():
        whole = model.encode(x)
    for batch_size in (3, 7, 2000):
        mean, logvar = model.posterior(x, batch_size=batch_size)
        assert mean.shape == logvar.shape == (7, 5)
        torch.testing.assert_close(mean, whole[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(logvar, whole[1], atol=1e-6, rtol=0)


def test_rate_per_dim_sums_to_the_mean_rate_and_mean_and_stderr_are_numpys():
    rng = np.random.default_rng(0)
    mean, logvar = torch.tensor(rng.normal(size=(9, 4))), torch.tensor(rng.normal(0, 0.8, size=(9, 4)))
    rate = rate_per_dim(mean, logvar)
    assert rate.shape == (4,) and (rate >= 0).all()
    assert math.isclose(rate.sum().item(), analytic_kl(mean, logvar).mean().item(), rel_tol=1e-12)
    values = rng.normal(size=9)
    m, se = mean_and_stderr(torch.tensor(values))
    assert math.isclose(m, values.mean()) and math.isclose(se, values.std(ddof=1) / 3)
    assert mean_and_stderr(torch.tensor([2.0])) == (2.0, None)
