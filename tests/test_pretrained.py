"""The model shipped inside vaekit, `pretrained:mnist`: the seed's recipe trained for 100 epochs,
taken by every command that takes a RUN and by the Python API, never written into: what a
command makes of it goes under ./pretrained-mnist/ in the working directory."""
import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import vaekit
from conftest import SAMPLE, cli_env
from test_cli import vaekit as run_vaekit
from vaekit import Config, Run, load_model, load_splits
from vaekit.cli import main
from vaekit.data import preprocess
from vaekit.errors import RunError
from vaekit.evaluate import elbo_report
from vaekit.pretrained import FOLDER
from vaekit.train_prior import train_prior

SHIPPED = FOLDER / "mnist"


def snapshot() -> dict:
    """Every file of the shipped model with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(SHIPPED.rglob("*"))}


def test_the_shipped_model_is_the_seeds_recipe_trained_for_100_epochs():
    assert sorted(p.name for p in SHIPPED.iterdir()) == ["config.json", "metrics.jsonl", "model.safetensors"]
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 5_000_000
    run = Run.open("pretrained:mnist")
    seed_recipe = Config()                          # `vaekit train` with no setting changed but one: it was
    seed_recipe.train.adam_eps = 1e-8               # trained before Keras's epsilon, 1e-7, became the default
    assert run.config() == seed_recipe
    assert [m["epoch"] for m in run.metrics()] == list(range(1, 101))
    model, _, runtime = load_model("pretrained:mnist", "cpu")
    test = load_splits("mnist", SAMPLE).test.images               # 500 real MNIST test digits
    elbo = elbo_report(model, preprocess(test, "static"), "static", runtime, runtime.generator(0))["elbo"]
    assert elbo > -85, elbo       # trained weights: about -78 over the whole test set; 10 epochs reach -93


def test_the_best_shipped_model_is_the_frontier_recipe_trained_with_every_layer_in_use():
    """pretrained:mnist-best: configs/mnist-frontier.json trained for 140 epochs, its best validation epoch's
    weights, a hierarchy of latent grids whose every layer carries information on real test digits."""
    best = FOLDER / "mnist-best"
    assert sorted(p.name for p in best.iterdir()) == ["config.json", "metrics.jsonl", "model.safetensors"]
    assert sum(p.stat().st_size for p in best.iterdir()) < 5_000_000
    recipe = Config.from_dict(json.loads((Path(__file__).parent.parent / "configs" / "mnist-frontier.json").read_text()))
    run = Run.open("pretrained:mnist-best")
    recipe.train.keep_every = run.config().train.keep_every    # the run began before --keep-every existed
    assert run.config() == recipe
    metrics = run.metrics()
    assert [m["epoch"] for m in metrics] == list(range(1, 141)) and all("val_elbo" in m for m in metrics)
    model, _, runtime = load_model("pretrained:mnist-best", "cpu", "fp32")
    assert model.config.family == "spatial" and model.config.prior == "vamp"
    test = load_splits("mnist", SAMPLE).test.images               # 500 real MNIST test digits
    gen = runtime.generator(0)
    report = elbo_report(model, preprocess(test, "dynamic", gen), "dynamic", runtime, gen)
    assert report["elbo"] > -88, report["elbo"]     # about -81.7 over the whole test set; untrained, near -540
    assert len(report["rate_per_layer"]) == 5 and min(report["rate_per_layer"]) > 2, report["rate_per_layer"]


def test_the_shipped_vq_model_samples_and_scores_with_its_prior(tmp_path, monkeypatch):
    """pretrained:mnist-vq: the recipe of configs/ trained, both stages: its prior belongs to its
    first stage's weights, it scores real test digits far above the uniform prior over codes,
    and `vaekit sample` draws code grids from the prior (under ./pretrained-mnist-vq/)."""
    from vaekit.evaluate import vq_report
    from vaekit.loading import load_prior, open_for_inference

    shipped = FOLDER / "mnist-vq"
    with pytest.raises(RunError, match="shipped with vaekit .* cannot be trained further"):
        train_prior("pretrained:mnist-vq", epochs=1, log=print)      # and leaves the package as it was:
    assert sorted(p.name for p in (shipped / "prior").iterdir()) == ["metrics.jsonl", "model.safetensors", "stage.json"]
    recipe = Path(__file__).parent.parent / "configs" / "mnist-vq.json"
    assert Run.open("pretrained:mnist-vq").config() == Config.from_dict(json.loads(recipe.read_text()))
    opened = open_for_inference("pretrained:mnist-vq", device="cpu", precision="fp32")
    prior = load_prior(opened, required_by="eval")
    gen = opened.runtime.generator(0)
    x = preprocess(load_splits("mnist", SAMPLE).test.images, "dynamic", gen)       # 500 real MNIST test digits
    learned, uniform = (vq_report(opened.model, x, "dynamic", 500, p) for p in (prior, None))
    # over all 10,000: -250.0 (distortion 11.5, codes 238.5 nats); the uniform prior's codes cost 305.7
    assert learned["elbo"] > -280 and learned["elbo"] > uniform["elbo"] + 50, (learned, uniform)
    monkeypatch.chdir(tmp_path)
    run_vaekit("sample", "pretrained:mnist-vq", "--n", "4", "--device", "cpu")
    assert (tmp_path / "pretrained-mnist-vq/samples/prior_n4_seed0.png").is_file()


def test_commands_and_the_api_write_under_the_working_directory_never_into_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot()
    result = run_vaekit("sample", "pretrained:mnist", "--n", "4", "--device", "cpu")
    assert result.stdout.strip() == "pretrained-mnist/samples/prior_n4_seed0.png"
    assert (tmp_path / "pretrained-mnist/samples/prior_n4_seed0.png").is_file()
    assert result.stderr == ("vaekit: pretrained:mnist is read-only (shipped inside vaekit), so this was written "
                             "under ./pretrained-mnist/\n")
    run_vaekit("eval", "pretrained:mnist", "--k", "2", "--data-dir", SAMPLE, "--device", "cpu", "--precision", "fp32")
    assert json.loads((tmp_path / "pretrained-mnist/eval.json").read_text())["static_k2_n500_seed0_fp32"]["n"] == 500
    png = vaekit.reconstruct_to_png("pretrained:mnist", n=2, data_dir=SAMPLE, device="cpu")
    assert png == Path("pretrained-mnist/samples/reconstruct_n2_seed0.png") and png.is_file()
    assert snapshot() == before


@pytest.mark.parametrize("args", [
    ["interpolate", "--steps", "2"], ["traverse", "--dims", "2", "--steps", "2"], ["latent"],
    ["attribute", "--to", "8", "--n", "2", "--steps", "2"],
    ["inpaint", "--n", "2", "--steps", "2", "--chains", "1", "--score-n", "4"],
])
def test_every_generation_command_takes_it(tmp_path, monkeypatch, capsys, args):
    monkeypatch.chdir(tmp_path)
    assert main([args[0], "pretrained:mnist", *args[1:], "--data-dir", str(SAMPLE), "--device", "cpu"]) == 0
    written = [line for line in capsys.readouterr().out.splitlines() if line.endswith((".png", ".gif"))]
    assert written and all((tmp_path / line).is_file() and line.startswith("pretrained-mnist/") for line in written)


def test_what_cannot_be_done_with_it_is_one_line(capsys):
    assert main(["train", "--resume", "pretrained:mnist"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaekit: error: ") and err.count("\n") == 1
    assert "shipped with vaekit (weights only, no optimizer state) and cannot be trained further" in err
    assert main(["gif", "pretrained:mnist"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaekit: error: pretrained:mnist has no epoch images") and err.count("\n") == 1
    assert "no GIF to make of it" in err
    assert main(["sample", "pretrained:cifar"]) == 2
    assert capsys.readouterr().err == ("vaekit: error: pretrained:cifar is not a model shipped with vaekit (shipped: "
                                       "pretrained:mnist, pretrained:mnist-best, pretrained:mnist-vq); pass one of them or a run directory\n")


def test_vaekit_serve_with_no_run_serves_it():
    pytest.importorskip("fastapi", reason="the demo extra is not installed: pip install -e '.[test,demo]'")
    proc = subprocess.Popen([sys.executable, "-m", "vaekit", "serve", "--port", "0", "--device", "cpu",
                             "--data-dir", str(SAMPLE)], stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        line = ""
        while " is on http://" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "vaekit serve exited before serving"
        assert line.startswith("vaekit: the demo of pretrained:mnist is on http://127.0.0.1:")
        url = line.split(" is on ")[1].split()[0]
        with urllib.request.urlopen(url.rstrip("/") + "/api/info", timeout=30) as response:
            assert response.status == 200 and json.loads(response.read())["latent_dim"] == 50
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
