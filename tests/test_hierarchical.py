"""The hierarchical (ladder) family, the VampPrior, the training aids and the validation split."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from conftest import sample_config
from vaekit import train
from vaekit.config import Config
from vaekit.errors import ConfigError
from vaekit.evaluate import iwae_bounds, likelihood_report
from vaekit.models import LadderVAE, ModelConfig, build_model
from vaekit.models.vae import mixture_log_pdf
from vaekit.errors import RunError
from vaekit.loading import load_model
from vaekit.schedule import EarlyStop, Schedule


def quiet(*_):
    pass


def tiny_ladder(layers=3, prior="standard", seed=0) -> LadderVAE:
    torch.manual_seed(seed)
    model = LadderVAE(ModelConfig(family="ladder", latent_dim=3, stochastic_layers=layers, image_size=8,
                                  prior=prior, pseudo_inputs=4)).double()
    for p in model.parameters():      # away from the zero-initialised heads: every path carries signal
        p.data.add_(torch.randn_like(p) * 0.05)
    return model


def gaussian(mean_logvar: torch.Tensor) -> Independent:
    mean, logvar = mean_logvar.chunk(2, dim=-1)
    return Independent(Normal(mean, torch.exp(0.5 * logvar)), 1)


def reference_log_w(model: LadderVAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """log p(x, z_1..z_L) - log q(z_1..z_L | x) in float64, written from the architecture with
    torch.distributions: each layer's prior and posterior as a Normal of the network's outputs."""
    d = model.config.latent_dim
    features = [model.encoder(x)]
    for block in model.up:
        features.append(block(features[-1]))
    q_top = gaussian(model.top_posterior(features[-1]))
    z = q_top.mean + q_top.base_dist.scale * eps[:, :d]
    log_p, log_q = Independent(Normal(torch.zeros_like(z), 1.0), 1).log_prob(z), q_top.log_prob(z)
    s = model.lift(z)
    for i in range(len(model.prior_heads)):
        p = gaussian(model.prior_heads[i](s))
        elu, linear = model.posterior_heads[i]                       # one layer of the concatenation
        delta = linear(elu(torch.cat([s, features[len(model.prior_heads) - 1 - i]], -1)))
        dm, dl = delta.chunk(2, -1)
        q = Independent(Normal(p.mean + dm, torch.exp(0.5 * (2 * p.base_dist.scale.log() + dl))), 1)
        z = q.mean + q.base_dist.scale * eps[:, (i + 1) * d:(i + 2) * d]
        log_p, log_q = log_p + p.log_prob(z), log_q + q.log_prob(z)
        s = model.merges[i](torch.cat([s, z], -1))
    logits = model.decoder(s)
    log_px = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    return log_px + log_p - log_q


def test_hierarchical_importance_weights_match_a_float64_reference():
    model = tiny_ladder()
    x = (torch.rand(5, 1, 8, 8) > 0.5).double()
    eps = torch.randn(5, model.noise_dim, dtype=torch.float64)
    with torch.no_grad():
        terms = model(x, eps=eps)
        expected = reference_log_w(model, x, eps)
        other = torch.randn_like(eps)
        draws = model(x, eps=torch.stack([eps, other]))        # K = 2 draws of each image, the features read once
        expected_draws = torch.stack([expected, reference_log_w(model, x, other)])
    torch.testing.assert_close(terms.log_w.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(draws.log_w.double(), expected_draws, rtol=1e-5, atol=1e-4)


def test_each_layers_closed_form_rate_is_the_expected_log_ratio():
    """The rates a pass reports (closed-form KLs, lower layers given the upper draws) average, over
    many draws, to E_q[log q - log p] of the whole hierarchy."""
    model = tiny_ladder(layers=2)
    x = (torch.rand(2, 1, 8, 8) > 0.5).double()
    with torch.no_grad():
        terms = model(x, eps=torch.randn(20_000, 2, model.noise_dim, dtype=torch.float64))
    mc = (terms.log_qz - terms.log_pz).mean(0)
    torch.testing.assert_close(terms.rate.sum(-1).mean(0), mc, rtol=0.01, atol=0.06)


@pytest.mark.parametrize("prior", ["standard", "vamp"])
def test_the_iwae_bound_lies_above_the_elbo_and_rises_with_k(prior):
    model = tiny_ladder(prior=prior)
    x = (torch.rand(4, 1, 8, 8) > 0.5).double()
    with torch.no_grad():
        elbo = model(x, eps=torch.randn(2000, 4, model.noise_dim, dtype=torch.float64)).log_w.mean(0)
    bound_10, bound_1000 = (iwae_bounds(model, x, k, seed=3) for k in (10, 1000))
    assert (bound_10 > elbo).all() and (bound_1000 > bound_10).all(), (elbo, bound_10, bound_1000)


def test_the_vamp_prior_density_is_the_mixture_of_its_pseudo_input_posteriors():
    model = tiny_ladder(prior="vamp")
    z = torch.randn(6, 3, dtype=torch.float64) * 2
    with torch.no_grad():
        mean, logvar = model.encode(model.pseudo_inputs.clamp(0, 1))
        mixture = MixtureSameFamily(Categorical(logits=torch.zeros(4, dtype=torch.float64)),
                                    Independent(Normal(mean, torch.exp(0.5 * logvar)), 1))
        torch.testing.assert_close(model.log_prior(z), mixture.log_prob(z))
        torch.testing.assert_close(mixture_log_pdf(z[:, None].expand(6, 2, 3), mean, logvar),
                                   mixture.log_prob(z)[:, None].expand(6, 2))


def test_vamp_prior_codes_come_from_its_components():
    model = tiny_ladder(prior="vamp")
    with torch.no_grad():
        mean, _ = model.prior_components()
        fixed = model.prior_codes(torch.zeros(8, 3, dtype=torch.float64))   # no noise: the components' means
    assert all(any(torch.allclose(code, m) for m in mean) for code in fixed)
    assert len({tuple(c.tolist()) for c in fixed}) == 4                      # spread over all four components


def test_the_ladder_samples_every_layer_and_decodes_top_codes():
    model = tiny_ladder()
    eps = torch.randn(4, model.noise_dim, dtype=torch.float64)
    with torch.no_grad():
        a, b = model.decode_prior(eps), model.decode_prior(torch.cat([eps[:, :3], torch.randn(4, 6, dtype=torch.float64)], 1))
        assert a.shape == (4, 1, 8, 8) and 0 <= a.min() and a.max() <= 1
        assert not torch.equal(a, b)                       # the lower layers' draws change the images
        torch.testing.assert_close(model.decode(eps[:, :3], as_image=True),
                                   model.decode_prior(torch.cat([eps[:, :3], torch.zeros(4, 6, dtype=torch.float64)], 1)))


def test_cosine_schedule_and_kl_warmup():
    tc = Config().train
    tc.epochs, tc.lr, tc.lr_final, tc.lr_schedule, tc.warmup_epochs = 10, 1e-3, 1e-5, "cosine", 2
    schedule = Schedule(tc, steps_per_epoch=100)
    assert schedule.lr(0) == 1e-3 and math.isclose(schedule.lr(1000), 1e-5)
    assert math.isclose(schedule.lr(500), (1e-3 + 1e-5) / 2)
    assert [schedule.kl_weight(s) for s in (0, 100, 200, 999)] == [0.0, 0.5, 1.0, 1.0]
    assert Schedule(Config().train, 100).lr(500) == Config().train.lr           # the seed's constant rate


def test_early_stop_counts_epochs_since_the_best_validation_elbo():
    lines = [{"epoch": e, "val_elbo": v} for e, v in enumerate([-100, -90, -95, -92], 1)]
    stop = EarlyStop(2, lines)
    assert (stop.best_epoch, stop.due()) == (2, True)
    assert not EarlyStop(3, lines).due() and not EarlyStop(0, lines).due()


def test_aids_that_need_another_setting_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="--validation"):
        Config.from_dict({"train": {"early_stop": 3}})
    with pytest.raises(ConfigError, match="--kl analytic"):
        Config.from_dict({"train": {"free_bits": 0.5}})
    with pytest.raises(ValueError, match="--family ladder"):
        ModelConfig(stochastic_layers=2)
    with pytest.raises(ValueError, match="--stochastic-layers 2"):
        ModelConfig(family="ladder", stochastic_layers=1)


def ladder_config(**train):
    config = sample_config(**train)
    config.model = ModelConfig(family="ladder", latent_dim=8, prior="vamp", pseudo_inputs=20)
    config.data.validation = 500
    config.data.binarization = "dynamic"
    config.train.lr, config.train.kl, config.train.warmup_epochs = 1e-3, "analytic", 1.0
    config.train.lr_schedule, config.train.clip_grad = "cosine", 100.0
    return config


def test_ladder_resume_is_bit_exact_and_the_validation_split_picks_the_best(tmp_path):
    def config(epochs):    # a constant rate: a cosine schedule follows --epochs, which the resume changes
        c = ladder_config(epochs=epochs)
        c.train.lr_schedule = "constant"
        return c

    straight = train(config(3), out=tmp_path / "a", log=quiet)
    resumed = train(config(2), out=tmp_path / "b", log=quiet)
    train(resume=resumed.path, epochs=3, log=quiet)
    a = load_file(str(straight.checkpoints.latest() / "model.safetensors"))
    b = load_file(str(resumed.checkpoints.latest() / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = straight.metrics()
    assert [m["epoch"] for m in metrics] == [1, 2, 3] and all("val_elbo" in m for m in metrics)
    best = max(metrics, key=lambda m: m["val_elbo"])
    assert json.loads((straight.checkpoints.path / "best" / "best.json").read_text())["epoch"] == best["epoch"]
    model, _, _ = load_model(f"{straight.path}@best", "cpu", "fp32", prepared=False)
    saved = load_file(str(next((straight.checkpoints.path / "best").glob("model-*.safetensors"))))
    assert all(torch.equal(model.state_dict()[k].contiguous(), saved[k]) for k in saved)


def test_early_stop_ends_training_and_best_is_refused_without_a_validation_split(tmp_path):
    config = ladder_config(epochs=6, early_stop=1)
    config.train.skip_grad = 1e-12      # no update: the validation ELBO moves by its noise alone, so an epoch
    run = train(config, out=tmp_path / "run", log=quiet)    # soon fails to beat the best (all six: 1/720)
    metrics = run.metrics()
    best = max(range(len(metrics)), key=lambda i: metrics[i]["val_elbo"])
    assert len(metrics) == best + 2 < 6          # stopped one epoch (the patience) after the best
    plain = train(sample_config(epochs=1), out=tmp_path / "plain", log=quiet)
    with pytest.raises(RunError, match="no best checkpoint"):
        load_model(f"{plain.path}@best", "cpu")
    with pytest.raises(ConfigError, match="without @best"):
        train(resume=f"{plain.path}@best", log=quiet)


def test_skip_grad_skips_every_update_above_its_norm(tmp_path):
    config = ladder_config(epochs=1)
    config.data.validation = 0
    config.train.skip_grad, config.train.clip_grad = 1e-12, 0.0
    run = train(config, out=tmp_path / "run", log=quiet)
    torch.manual_seed(config.train.seed)
    untrained = build_model(config.model).state_dict()
    trained = load_file(str(run.checkpoints.latest() / "model.safetensors"))
    assert all(torch.equal(untrained[k], trained[k]) for k in trained)
    assert run.metrics()[0]["skipped_updates"] == 20          # 2,000 images, batches of 100


def test_eval_of_a_ladder_model_reports_every_layer(tmp_path):
    run = train(ladder_config(epochs=1), out=tmp_path / "run", log=quiet)
    assert run.metrics()[0]["lr"] < 1e-3 / 2                      # the cosine schedule's rate at the epoch's end
    model, config, rt = load_model(run.path, "cpu", "fp32")
    from vaekit.data import preprocess, splits_for
    gen = rt.generator(0)
    x = preprocess(splits_for(config.data).test.images[:20], "dynamic", gen)
    result = likelihood_report(model, x, "dynamic", rt, gen, k=20, decode_batch=64)
    assert len(result["rate_per_layer"]) == 2 and "rate_per_dim" not in result
    assert abs(sum(result["rate_per_layer"]) - result["rate"]) < 1e-2
    assert result["units_per_layer"] == [8, 8] and result["active_units_per_layer"][0] == result["active_units"]
    assert result["iwae_bound"] > result["elbo"] - 3 * result["elbo_stderr"]


def test_train_reads_a_recipe_file_with_flags_over_it(tmp_path, capsys):
    from conftest import SAMPLE
    from vaekit.cli import main

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"model": {"latent_dim": 7}, "train": {"epochs": 3, "lr": 1e-3}}))
    assert main(["train", "--config", str(recipe), "--epochs", "1", "--out", str(tmp_path / "run"),
                 "--data-dir", str(SAMPLE), "--device", "cpu"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["model"]["latent_dim"], saved["train"]["lr"], saved["train"]["epochs"]) == (7, 1e-3, 1)
    recipe.write_text('{"model": {"latent_dimm": 7}}')
    assert main(["train", "--config", str(recipe), "--out", str(tmp_path / "other")]) == 2
    assert "unknown key(s) latent_dimm" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.json"), "--out", str(tmp_path / "other")]) == 2
    assert "cannot read --config" in capsys.readouterr().err

