"""The spatial family: a hierarchy of latent grids (models/spatial_vae.py), its importance weights
against a float64 reference written from the architecture, its rates, sampling, and the tools
on a trained model."""
import json

import pytest
import torch
from torch.distributions import Independent, Normal

from conftest import SAMPLE, sample_config
from vaekit import train
from vaekit.errors import ConfigError
from vaekit.evaluate import iwae_bounds
from vaekit.models import ModelConfig, SpatialVAE


def tiny_spatial(prior="standard", groups=2, seed=0) -> SpatialVAE:
    torch.manual_seed(seed)
    model = SpatialVAE(ModelConfig(family="spatial", latent_dim=3, image_size=16, hidden_channels=8, res_blocks=1,
                                   latent_channels=2, latent_groups=groups, prior=prior, pseudo_inputs=4)).double()
    for p in model.parameters():      # away from the zero-initialised heads and blocks: every path carries signal
        p.data.add_(torch.randn_like(p) * 0.03)
    return model


def gaussian(head_output: torch.Tensor) -> Independent:
    """The diagonal Gaussian a head's output [N,2C,H,W] (or [N,2D]) means: its first half the
    means, its second the log-variances, each softly bounded (5 tanh(. / 5) of the mean and of
    the log standard deviation)."""
    mean, logvar = head_output.flatten(1).unflatten(1, (2, -1)).unbind(1)
    return Independent(Normal(5 * torch.tanh(mean / 5), torch.exp(5 * torch.tanh(logvar / 10))), 1)


def reference_log_w(model: SpatialVAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """log p(x, z) - log q(z | x) in float64 over every layer, written from the architecture with
    torch.distributions: the bottom-up stages, the top layer, then each group of each scale with
    its prior from the top-down state and its posterior that prior plus the head's correction."""
    h_fine = model.encoder(x)
    h_coarse = model.up[0](h_fine)
    q_top = gaussian(model.top_posterior(h_coarse))
    d = model.config.latent_dim
    z = q_top.mean + q_top.base_dist.scale * eps[:, :d]
    log_p, log_q = Independent(Normal(torch.zeros_like(z), 1.0), 1).log_prob(z), q_top.log_prob(z)
    s, used = model.lift(z), d
    for g, h in enumerate([h_coarse, h_coarse, h_fine, h_fine]):          # 2 groups at 4x4, then 2 at 8x8 (16 px images)
        if g == 2:
            s = model.upsample[0](s)
        s = model.cells[g](s)
        p = gaussian(model.prior_heads[g](s))
        relu, conv = model.posterior_heads[g]                         # one convolution of the concatenation
        delta = gaussian(conv(relu(torch.cat([s, h], 1))))
        q = Independent(Normal(p.mean + delta.mean, p.base_dist.scale * delta.base_dist.scale), 1)
        n = p.mean.shape[1]
        z = q.mean + q.base_dist.scale * eps[:, used:used + n]
        used += n
        log_p, log_q = log_p + p.log_prob(z), log_q + q.log_prob(z)
        s = s + model.merges[g](z.view(len(z), 2, *s.shape[2:]))
    logits = model.decoder(s)
    log_px = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    assert used == model.noise_dim
    return log_px + log_p - log_q


def test_spatial_importance_weights_match_a_float64_reference():
    model = tiny_spatial()
    assert model.scales == [4, 8] and model.config.layers_of_z == 5
    x = (torch.rand(5, 1, 16, 16) > 0.5).double()
    eps = torch.randn(5, model.noise_dim, dtype=torch.float64)
    with torch.no_grad():
        terms = model(x, eps=eps)
        expected = reference_log_w(model, x, eps)
        other = torch.randn_like(eps)
        draws = model(x, eps=torch.stack([eps, other]))        # K = 2 draws of each image, the features read once
        expected_draws = torch.stack([expected, reference_log_w(model, x, other)])
    torch.testing.assert_close(terms.log_w, expected, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(draws.log_w, expected_draws, rtol=1e-6, atol=1e-4)
    assert terms.rate.shape == (5, 5)


def test_each_groups_closed_form_rate_is_the_expected_log_ratio():
    """The per-layer rates a pass reports (closed-form KLs, each group given the draws above it)
    sum, averaged over many draws, to E_q[log q - log p] of the whole hierarchy."""
    model = tiny_spatial(groups=1)
    x = (torch.rand(2, 1, 16, 16) > 0.5).double()
    with torch.no_grad():
        terms = model(x, eps=torch.randn(4000, 2, model.noise_dim, dtype=torch.float64))
    mc = (terms.log_qz - terms.log_pz).mean(0)                  # its standard error: about 0.04 nats here
    assert (terms.rate.mean(0)[:, 1:] > 0.4).all()                 # each grid's rate is well above that
    torch.testing.assert_close(terms.rate.sum(-1).mean(0), mc, rtol=0.01, atol=0.15)


@pytest.mark.parametrize("prior", ["standard", "vamp"])
def test_the_spatial_iwae_bound_lies_above_the_elbo_and_rises_with_k(prior):
    model = tiny_spatial(prior=prior)
    x = (torch.rand(4, 1, 16, 16) > 0.5).double()
    with torch.no_grad():
        elbo = model(x, eps=torch.randn(500, 4, model.noise_dim, dtype=torch.float64)).log_w.mean(0)
    bound_10, bound_500 = (iwae_bounds(model, x, k, seed=3) for k in (10, 500))
    # per image the bounds are random (K draws each); over the 4 images the rise is clear of that noise
    assert (bound_10 > elbo).all() and bound_500.mean() > bound_10.mean() + 1, (elbo, bound_10, bound_500)


def test_the_spatial_model_samples_every_layer_and_decodes_top_codes():
    model = tiny_spatial()
    eps = torch.randn(4, model.noise_dim, dtype=torch.float64)
    lower = model.noise_dim - 3
    with torch.no_grad():
        a = model.decode_prior(eps)
        b = model.decode_prior(torch.cat([eps[:, :3], torch.randn(4, lower, dtype=torch.float64)], 1))
        assert a.shape == (4, 1, 16, 16) and 0 <= a.min() and a.max() <= 1
        assert not torch.equal(a, b)                       # the grids' draws change the images
        torch.testing.assert_close(model.decode(eps[:, :3], as_image=True),
                                   model.decode_prior(torch.cat([eps[:, :3], torch.zeros(4, lower, dtype=torch.float64)], 1)))


def test_settings_the_spatial_family_does_not_take_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="drop --stochastic-layers"):
        ModelConfig(family="spatial", stochastic_layers=3)
    with pytest.raises(ConfigError, match="--latent-groups 1 or more"):
        ModelConfig(family="spatial", latent_groups=0)
    with pytest.raises(ValueError, match="drop --conditional"):
        SpatialVAE(ModelConfig(family="spatial", conditional=True, num_classes=10))


def test_a_spatial_run_trains_evaluates_and_samples_with_every_layer_reported(tmp_path):
    """Through the command line, as a user runs it: training (KL warm-up, the analytic rate with
    free bits per group), the progress grid, `eval` reporting each layer's rate and active units,
    `sample` and `reconstruct`."""
    from vaekit.cli import main

    run = tmp_path / "run"
    assert main(["train", "--family", "spatial", "--hidden-channels", "16", "--res-blocks", "1", "--latent-dim", "8",
                 "--latent-channels", "2", "--epochs", "1", "--kl", "analytic", "--free-bits", "0.1",
                 "--warmup-epochs", "0.5", "--lr", "1e-3", "--binarization", "dynamic", "--data-dir", str(SAMPLE),
                 "--out", str(run), "--device", "cpu"]) == 0
    assert (run / "images" / "image_at_epoch_0000.png").exists() and (run / "images" / "image_at_epoch_0001.png").exists()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["test_elbo"] < 0
    assert main(["eval", str(run), "--k", "10", "--n", "50"]) == 0
    result = json.loads((run / "eval.json").read_text())
    record = next(iter(result.values())) if "rate_per_layer" not in result else result
    assert len(record["rate_per_layer"]) == 5
    assert abs(sum(record["rate_per_layer"]) - record["rate"]) < 1e-2
    assert record["units_per_layer"] == [8, 2 * 7 * 7, 2 * 7 * 7, 2 * 14 * 14, 2 * 14 * 14]
    assert len(record["active_units_per_layer"]) == 5 and record["active_units_per_layer"][0] == record["active_units"]
    for command in (["sample", str(run), "--n", "4"], ["reconstruct", str(run), "--n", "4", "--data-dir", str(SAMPLE)]):
        out = tmp_path / f"{command[0]}.png"
        assert main([*command, "--out", str(out)]) == 0 and out.stat().st_size > 0


def test_spatial_resume_is_bit_exact(tmp_path):
    from safetensors.torch import load_file

    def config(epochs):
        c = sample_config(epochs=epochs)
        c.model = ModelConfig(family="spatial", latent_dim=4, hidden_channels=16, res_blocks=1, latent_channels=2)
        c.train.lr, c.train.kl, c.train.warmup_epochs = 1e-3, "analytic", 1.0
        return c

    straight = train(config(2), out=tmp_path / "a", log=lambda *_: None)
    resumed = train(config(1), out=tmp_path / "b", log=lambda *_: None)
    train(resume=resumed.path, epochs=2, log=lambda *_: None)
    a = load_file(str(straight.checkpoints.latest() / "model.safetensors"))
    b = load_file(str(resumed.checkpoints.latest() / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_ladder_recipe_builds_the_ladder_that_was_pretrained_mnist_best():
    from pathlib import Path

    from vaekit.config import Config
    from vaekit.models import build_model

    recipe = Path(__file__).parent.parent / "configs" / "mnist-ladder.json"
    config = Config.from_dict(json.loads(recipe.read_text()))
    model = build_model(config.model)
    assert type(model).__name__ == "LadderVAE" and config.model.layers_of_z == 2 and len(model.pseudo_inputs) == 500
    assert (config.train.epochs, config.train.lr, config.data.validation) == (120, 1e-3, 10000)


def test_the_frontier_recipe_builds_a_spatial_model_with_a_vamp_prior():
    from pathlib import Path

    from vaekit.config import Config
    from vaekit.models import build_model

    recipe = Path(__file__).parent.parent / "configs" / "mnist-frontier.json"
    config = Config.from_dict(json.loads(recipe.read_text()))
    model = build_model(config.model)
    assert isinstance(model, SpatialVAE) and model.scales == [7, 14] and config.model.layers_of_z == 5
    assert model.noise_dim == 32 + 2 * 8 * 7 * 7 + 2 * 8 * 14 * 14 and len(model.pseudo_inputs) == 100
    assert config.train.kl == "analytic" and config.train.free_bits == 2.0
