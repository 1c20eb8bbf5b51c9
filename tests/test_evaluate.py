"""`vaekit eval` on a model trained briefly on the shipped MNIST sample: the IWAE bound against the
ELBO, exact sums over every test image, reproducible dynamic binarization, the CLI end to end."""
import json
import math

import pytest
import torch

from conftest import sample_config
from test_cli import vaekit
from vaekit import load_model, load_splits, train
from vaekit.api import evaluate_run
from vaekit.cli import main
from vaekit.data import preprocess
from vaekit.evaluate import evaluate_elbo, iwae_bounds


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = sample_config(epochs=5, lr=1e-3, batch_size=32)
    return train(config, out=tmp_path_factory.mktemp("eval") / "run", log=lambda *_: None).path


@pytest.fixture(scope="module")
def model_and_test(run):
    model, config, rt = load_model(run, "cpu")
    return model, rt, load_splits("mnist", config.data.data_dir).test.images


def test_iwae_bound_is_above_the_elbo_and_rises_with_k(model_and_test):
    model, rt, images = model_and_test
    images = images[:200]
    elbo = evaluate_elbo(model, images, "static", rt)
    x = preprocess(images, "static")
    bounds = {k: iwae_bounds(model, x, k, rt.generator(1)).double().mean().item() for k in (1, 5, 50)}
    assert abs(bounds[1] - elbo["elbo_analytic_kl"]) < 2      # K = 1 is the ELBO, up to sampling noise
    assert elbo["elbo_analytic_kl"] < bounds[5] < bounds[50], (elbo, bounds)
    assert bounds[50] - bounds[1] > 1                           # a real gain, not noise


def test_iwae_bounds_cover_every_image_in_chunks(model_and_test):
    """Chunks over images and over K (here 3 + 3 + 1 draws a pass) keep every image and every draw."""
    model, rt, images = model_and_test
    x = preprocess(images[:7], "static")
    chunked = iwae_bounds(model, x, 7, rt.generator(0), batch_size=3)
    assert chunked.shape == (7,) and torch.isfinite(chunked).all()
    whole = iwae_bounds(model, x, 7, rt.generator(0), batch_size=49)
    assert abs(chunked.mean() - whole.mean()) < 5               # the same bound, other random draws


def test_eval_json_holds_each_protocol_and_dynamic_is_reproducible(run):
    static = evaluate_run(run, k=4, device="cpu")
    dynamic = evaluate_run(run, k=4, binarization="dynamic", seed=3, device="cpu")
    again = evaluate_run(run, k=4, binarization="dynamic", seed=3, device="cpu")
    assert {k: v for k, v in dynamic.items() if k != "seconds"} == {k: v for k, v in again.items() if k != "seconds"}
    saved = json.loads((run / "eval.json").read_text())
    assert set(saved) == {"static", "dynamic"}
    assert saved["static"]["elbo"] == static["elbo"] and "the seed" in saved["static"]["protocol"]
    assert "seed 3" in saved["dynamic"]["protocol"]
    for r in (static, dynamic):
        assert r["n"] == 500                                    # the whole sample test set
        assert r["iwae_bound"] >= r["elbo_analytic_kl"] - 1
        assert r["nll_upper_bound"] == -r["iwae_bound"]
        assert 0 < r["active_units"] <= r["latent_dim"] == 50
        assert math.isclose(sum(r["rate_per_dim"]), r["rate"], abs_tol=0.01)   # the rate, dimension by dimension


def test_cli_eval_prints_a_table_with_the_protocol_beside_each_number(run):
    out = vaekit("eval", run, "--k", "3", "--device", "cpu").stdout
    rows = [line for line in out.splitlines() if line.endswith("  static")]
    assert [row.strip().split("  ")[0] for row in rows] == [
        "test ELBO, single-sample (the seed's)", "test ELBO, analytic KL", "distortion", "rate", "IWAE bound, K=3",
        "NLL <= -IWAE bound, K=3", "active units (Cov > 0.01)"]
    assert "NLL <= -IWAE bound, K=3" in out and (run / "eval.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--k", "0"], "--k must be at least 1"),
    (["--binarization", "fuzzy"], "--binarization must be one of static, dynamic"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_eval_input_gets_one_line(run, capsys, args, message):
    assert main(["eval", str(run), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaekit: error: ") and err.count("\n") == 1 and message in err
