"""Likelihoods, objectives, precisions, padding, binarizations, families and conditioning end to
end: short real trainings on the shipped MNIST sample, through the library's entry points and the
`vaekit` command."""
import importlib
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SAMPLE, Log, cli_env, sample_config
from vaekit import Config, ConfigError, Run, interpolate_to_png, load_model, sample_to_png, train
from vaekit.api import eval_to_json
from vaekit.data import load_splits, preprocess, read_idx, write_idx
from vaekit.distributed import setup
from vaekit.evaluate import elbo_report
from vaekit.generate import prior_samples
from vaekit.models import ModelConfig, build_model
from vaekit.viz import grid_image


def quiet(*_):
    pass


def vaekit(*args):
    return subprocess.run([sys.executable, "-m", "vaekit", *map(str, args)], capture_output=True, text=True,
                          env=cli_env(), timeout=300)


def variant(epochs=1, **model):
    config = sample_config(epochs=epochs, lr=1e-3)
    for key, value in model.items():
        setattr(config.model, key, value)
    return config


@pytest.fixture(scope="module")
def logistic_run(tmp_path_factory):
    """`vaekit train` on grey levels with the discretized logistic, then `vaekit eval`."""
    run = tmp_path_factory.mktemp("logistic") / "run"
    trained = vaekit("train", "--data-dir", SAMPLE, "--epochs", "1", "--lr", "1e-3", "--device", "cpu",
                     "--binarization", "none", "--likelihood", "logistic", "--out", run)
    assert trained.returncode == 0, trained.stderr
    evaluated = vaekit("eval", run, "--k", "4", "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    return run, evaluated.stdout


def test_logistic_on_grey_levels_reports_bits_per_dim(logistic_run):
    run, table = logistic_run
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    dims = 28 * 28
    assert metrics["test_bits_per_dim"] == pytest.approx(-metrics["test_elbo"] / (dims * math.log(2)))
    assert 0 < metrics["test_bits_per_dim"] < 8     # below the 8 bits of a uniform guess after one epoch
    [record] = [v for key, v in json.loads((run / "eval.json").read_text()).items() if key.startswith("none_k4_n500_seed0_")]
    assert record["likelihood"] == "logistic" and record["protocol"].startswith("none")
    assert record["nll_bits_per_dim"] == pytest.approx(record["nll_upper_bound"] / (dims * math.log(2)))
    assert record["nll_bits_per_dim"] <= record["bits_per_dim"] + 0.05   # the IWAE bound is the tighter one
    assert "bits/dim, 8-bit scale" in table


def test_bernoulli_on_grey_levels_is_refused_in_one_line_unless_asked(tmp_path):
    result = vaekit("train", "--data-dir", SAMPLE, "--binarization", "none", "--out", tmp_path / "x")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--allow-continuous-bernoulli" in result.stderr
    config = Config.from_dict({"data": {"binarization": "none"}, "model": {"allow_continuous_bernoulli": True}})
    assert config.model.likelihood == "bernoulli"
    with pytest.raises(ConfigError, match="bernoulli"):
        Config.from_dict({"data": {"binarization": "none"}})


def test_model_that_does_not_fit_the_data_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="1-channel 28x28 images.*--image-channels 1 --image-size 28"):
        train(variant(image_size=32, image_channels=3), out=tmp_path / "run", log=quiet)


def test_beta_changes_the_training_loss_but_the_reported_elbo_is_at_beta_one(tmp_path):
    plain = train(variant(), out=tmp_path / "plain", log=quiet).metrics()[0]
    run = train(variant(beta=4.0), out=tmp_path / "beta", log=quiet)
    weighted = run.metrics()[0]
    assert weighted["train_loss"] != plain["train_loss"]
    assert weighted["test_rate"] < plain["test_rate"]           # a heavier rate term buys a smaller rate
    # the reported number is the plain ELBO of the trained model, recomputed here without any beta
    model, config, _ = load_model(run.path, "cpu")
    rt = setup("cpu", config.train.precision)
    gen = rt.generator(config.train.seed * 1_000_003 + 1)
    x = preprocess(load_splits("mnist", SAMPLE).test.images, "static", gen)
    fresh = elbo_report(model, x, "static", rt, gen, 500)
    assert fresh["elbo"] == pytest.approx(weighted["test_elbo"], abs=1e-3)
    assert fresh["elbo"] == pytest.approx(-(fresh["distortion"] + fresh["rate"]), abs=5)


def test_iwae_objective_trains_and_reports_its_bound_beside_the_elbo(tmp_path):
    metrics = train(variant(objective="iwae", iwae_k=3), out=tmp_path / "run", log=quiet).metrics()[0]
    assert metrics["test_iwae_bound_k3"] >= metrics["test_elbo"]
    assert metrics["test_elbo"] > -300                            # it learned: an untrained model sits near -540


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    return train(variant(epochs=4, conditional=True), out=tmp_path_factory.mktemp("cond") / "run", log=quiet)


def test_conditional_samples_follow_the_label(conditional_run):
    """The mean of 100 draws for label 0 lies nearer the training 0s' mean image than the draws
    for label 1 do, and the other way round."""
    assert json.loads(conditional_run.config_path.read_text())["model"]["num_classes"] == 10
    model, _, rt = load_model(conditional_run.path, "cpu")
    train_split = load_splits("mnist", SAMPLE).train
    class_means = torch.stack([train_split.images[train_split.labels == c].float().mean(0) / 255 for c in (0, 1)])
    drawn = torch.stack([prior_samples(model, 100, rt.generator(0), label).mean(0) for label in (0, 1)])
    distance = ((drawn[:, None] - class_means[None]) ** 2).flatten(2).sum(2)     # [label drawn, class mean]
    assert distance[0, 0] < distance[1, 0] and distance[1, 1] < distance[0, 1], distance


def test_a_conditional_model_scores_its_validation_split_with_its_labels(tmp_path):
    config = variant(conditional=True)
    config.data.validation, config.train.batch_size = 500, 500
    record = train(config, out=tmp_path / "run", log=quiet).metrics()[0]
    assert math.isfinite(record["val_elbo"]) and record["val_rate"] > 0


def test_sample_label_via_cli_and_its_one_line_errors(conditional_run, logistic_run):
    out = vaekit("sample", conditional_run.path, "--label", "7", "--n", "4", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("prior_n4_seed0_label7.png")
    result = vaekit("sample", conditional_run.path, "--label", "10", "--device", "cpu")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "0..9" in result.stderr
    with pytest.raises(ConfigError, match="pass --label 0..9"):
        sample_to_png(conditional_run.path, device="cpu")
    with pytest.raises(ConfigError, match="not a class-conditional model"):
        sample_to_png(logistic_run[0], label=3, device="cpu")
    with pytest.raises(ConfigError, match="class-conditional: use `vaekit sample --label`"):
        interpolate_to_png(conditional_run.path, device="cpu")


# -- one short run per variant, on a fifth of the sample: a second or two each -----------------------

@pytest.fixture(scope="module")
def small_sample(tmp_path_factory):
    """The first 500 training and 100 test images of the shipped sample, as IDX files."""
    folder = tmp_path_factory.mktemp("small-sample")
    for path in SAMPLE.glob("*.gz"):
        write_idx(folder / path.name, read_idx(path)[:500 if path.name.startswith("train") else 100])
    return folder


SMALL_STEPS = 20   # a step per 25 of the 500 training images


def small(data_dir, epochs=1, binarization="static", precision="fp32", **model):
    """Epochs of SMALL_STEPS steps on `data_dir` (as many as an epoch of the whole sample has), in fp32
    unless asked."""
    config = variant(epochs, **model)
    config.data.data_dir, config.data.binarization, config.train.precision = str(data_dir), binarization, precision
    config.train.batch_size = 500 // SMALL_STEPS
    return config


def untrained_elbo(config: Config) -> float:
    """The test ELBO of a fresh model of `config`: what a run must beat to have learned anything."""
    torch.manual_seed(0)
    model = build_model(config.model)
    rt = setup("cpu", "fp32")
    gen = rt.generator(0)
    x = preprocess(load_splits("mnist", config.data.data_dir).test.images, config.data.binarization, gen)
    return elbo_report(model, x, config.data.binarization, rt, gen)["elbo"]


@pytest.fixture(scope="module")
def precision_runs(small_sample, tmp_path_factory):
    """The same run in fp32 and in bf16: {precision: (first metrics line, its log)}."""
    runs = {}
    for precision in ("fp32", "bf16"):
        log = Log()
        run = train(small(small_sample, precision=precision), out=tmp_path_factory.mktemp(precision) / "run", log=log)
        assert json.loads(run.config_path.read_text())["train"]["precision"] == precision
        runs[precision] = run.metrics()[0], log
    return runs


def test_bf16_training_agrees_with_fp32(precision_runs):
    """bf16 autocast really ran (the same seeded run gives other numbers, where two fp32 runs repeat
    bit for bit: see test_train), and agrees with fp32: over seeds 0-3 the test ELBOs came 0.05-0.32
    nats apart, the training losses 0.01-0.06. Valid where bf16 is emulated too, only slower."""
    (fp32, fp32_log), (bf16, bf16_log) = precision_runs["fp32"], precision_runs["bf16"]
    assert fp32_log.has("(fp32)") and bf16_log.has("(bf16)")
    assert bf16["train_loss"] != fp32["train_loss"] and bf16["test_elbo"] != fp32["test_elbo"]
    assert bf16["test_elbo"] == pytest.approx(fp32["test_elbo"], abs=1.0)
    assert bf16["train_loss"] == pytest.approx(fp32["train_loss"], abs=0.25)


@pytest.fixture(scope="module")
def tf_padding_run(small_sample, tmp_path_factory):
    run = tmp_path_factory.mktemp("tf-padding") / "run"
    trained = vaekit("train", "--data-dir", small_sample, "--epochs", "1", "--lr", "1e-3", "--device", "cpu",
                     "--batch-size", 500 // SMALL_STEPS, "--tf-padding", "--out", run)
    assert trained.returncode == 0, trained.stderr
    return run


def test_tf_padding_trains_and_draws_on_the_seeds_output_grid(tf_padding_run):
    """The run records --tf-padding; its progress grid and its model for inference decode on TF's
    grid (the seed's: tests/test_models.py checks the crop), which the default padding shifts by a pixel."""
    run = Run(tf_padding_run)
    assert json.loads(run.config_path.read_text())["model"]["tf_padding"] is True
    model, config, _ = load_model(run.path, "cpu", "fp32", prepared=False)
    shifted = build_model(ModelConfig(**{**vars(config.model), "tf_padding": False}))
    shifted.load_state_dict(model.state_dict())           # the same weights on the default grid
    z = run.fixed_z()
    with torch.inference_mode():
        tf_images, shifted_images = model.decode_prior(z), shifted.decode_prior(z)
        prepared, _, _ = load_model(run.path, "cpu", "fp32")
        torch.testing.assert_close(prepared.decode(z, as_image=True), tf_images, rtol=1e-5, atol=1e-5)
    drawn = np.asarray(Image.open(run.image_path(1)), dtype=np.int16)      # the grid training drew, grey levels

    def off_by(images):   # the most any pixel of `images`, drawn as that grid, differs from it
        return np.abs(drawn - np.asarray(grid_image(images), dtype=np.int16)).max()

    assert off_by(tf_images) <= 1                          # rounding alone
    assert off_by(shifted_images) > 8                      # the same weights, drawn one pixel over


@pytest.fixture(scope="module")
def dynamic_run(small_sample, tmp_path_factory):
    """Two epochs with dynamic binarization; returns the run and each training step's (uint8 images,
    binarised x), as the training loop preprocessed them."""
    loop = importlib.import_module("vaekit.train")       # `vaekit.train` itself is the function
    steps, real = [], loop.preprocess

    def preprocess(images, binarization, generator=None):
        x = real(images, binarization, generator)
        if len(images) == 500 // SMALL_STEPS:       # a training batch (the epoch's test pass binarises 100)
            steps.append((images.cpu(), x.cpu()))
        return x

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "preprocess", preprocess)
        run = train(small(small_sample, epochs=2, binarization="dynamic"),
                    out=tmp_path_factory.mktemp("dynamic") / "run", log=quiet)
    return run, steps


def test_dynamic_binarization_draws_each_image_again_every_epoch(dynamic_run):
    """What the model trains on: binary images drawn with p = pixel / 255, every image drawn afresh
    in each epoch."""
    run, steps = dynamic_run
    assert len(steps) == 2 * SMALL_STEPS
    images = torch.cat([i for i, _ in steps]).float() / 255
    x = torch.cat([x for _, x in steps])
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert (x[images == 0] == 0).all() and (x[images == 1] == 1).all()
    assert abs(x.mean().item() - images.mean().item()) < 0.005      # a Bernoulli draw with p = pixel / 255

    def draws(epoch_steps):   # {an image's bytes: its binarised bytes}
        return {i.numpy().tobytes(): b.numpy().tobytes() for batch, xs in epoch_steps for i, b in zip(batch, xs)}

    first, second = draws(steps[:SMALL_STEPS]), draws(steps[SMALL_STEPS:])
    assert first.keys() == second.keys() and len(first) >= 495    # every image, once an epoch
    assert sum(first[k] != second[k] for k in first) >= 0.99 * len(first)


def test_a_dynamic_run_learns_and_is_scored_on_dynamic_draws(dynamic_run, precision_runs):
    """Its test ELBO is another number than the static run's of the same seed; `vaekit eval` scores it
    on a seeded draw by default, the same number for the same seed, and the static threshold of the
    same weights scores otherwise."""
    run, _ = dynamic_run
    first, second = (m["test_elbo"] for m in run.metrics())
    assert first != precision_runs["fp32"][0]["test_elbo"] and second > first
    dynamic = eval_to_json(run.path, k=4, seed=3, device="cpu", precision="fp32")
    assert dynamic["binarization"] == "dynamic" and "seed 3" in dynamic["protocol"]
    assert eval_to_json(run.path, k=4, seed=3, device="cpu", precision="fp32")["elbo"] == dynamic["elbo"]
    assert eval_to_json(run.path, k=4, binarization="static", device="cpu", precision="fp32")["elbo"] != dynamic["elbo"]


@pytest.fixture(scope="module", params=["gaussian", "gaussian-fixed"])
def gaussian_run(request, small_sample, tmp_path_factory):
    config = small(small_sample, binarization="none", likelihood=request.param)
    return train(config, out=tmp_path_factory.mktemp(request.param) / "run", log=quiet), config


def test_gaussian_likelihoods_train_on_grey_levels_and_report_bits_per_dim(gaussian_run):
    """bits/dim of a density on [0, 1] on the 8-bit scale: (-log p / D + ln 255) / ln 2 per value."""
    run, config = gaussian_run
    metrics = run.metrics()[0]
    dims = 28 * 28
    assert metrics["test_elbo"] > untrained_elbo(config) + 100
    assert metrics["test_bits_per_dim"] == pytest.approx((-metrics["test_elbo"] / dims + math.log(255)) / math.log(2))
    record = eval_to_json(run.path, k=4, device="cpu", precision="fp32")
    assert record["likelihood"] == config.model.likelihood and record["protocol"].startswith("none")
    assert record["n"] == 100                                       # every test image of the small sample
    assert record["nll_bits_per_dim"] == pytest.approx((record["nll_upper_bound"] / dims + math.log(255)) / math.log(2))
    assert record["nll_bits_per_dim"] <= record["bits_per_dim"] + 0.05


@pytest.fixture(scope="module")
def resnet_run(small_sample, tmp_path_factory):
    config = small(small_sample, family="resnet")
    return train(config, out=tmp_path_factory.mktemp("resnet") / "run", log=quiet), config


def test_resnet_family_trains_evaluates_and_samples(resnet_run):
    run, config = resnet_run
    assert json.loads(run.config_path.read_text())["model"]["family"] == "resnet"
    metrics = run.metrics()[0]
    assert metrics["test_elbo"] > untrained_elbo(config) + 100, metrics["test_elbo"]
    record = eval_to_json(run.path, k=4, device="cpu", precision="fp32")
    assert record["n"] == 100 and record["iwae_bound"] >= record["elbo_analytic_kl"] - 1
    assert 0 < record["active_units"] <= 50
    grid = Image.open(sample_to_png(run.path, n=4, device="cpu"))
    assert grid.size == (4 * (2 * 30 + 2),) * 2                    # 2x2 cells of 28+2 px, enlarged 4x
