"""The vq family through vaekit's own entry points on the MNIST sample: training (its metrics,
exact resume with the codebook's buffers and restarts), the prior's stage, and the tools."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import sample_config
from test_cli import vaekit
from vaekit import Config, train
from vaekit.errors import ConfigError

TINY = {"family": "vq", "codebook_size": 32, "code_dim": 8, "hidden_channels": 16, "res_blocks": 1, "dead_after": 10,
        "prior_width": 16, "prior_layers": 1, "prior_heads": 2}


def quiet(*_):
    pass


def vq_config(**train_settings):
    config = sample_config(lr=1e-3, **train_settings)
    for key, value in TINY.items():
        setattr(config.model, key, value)
    return config


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_vq_training_records_usage_and_the_uniform_prior_bound(tmp_path):
    run = train(vq_config(epochs=2), out=tmp_path / "run", log=quiet)
    metrics = run.metrics()
    assert [m["step"] for m in metrics] == [20, 40]
    for m in metrics:
        assert {"perplexity", "dead_codes", "restarts", "test_distortion"} <= set(m)
        assert 1 <= m["perplexity"] <= 32 and 0 <= m["dead_codes"] <= 32
        # before a prior exists, the bound's rate is the uniform prior's 7 x 7 x ln 32 nats
        assert m["test_rate"] == pytest.approx(49 * torch.log(torch.tensor(32.0)).item())
        assert m["test_elbo"] == pytest.approx(-m["test_distortion"] - m["test_rate"])
    assert metrics[1]["test_distortion"] < metrics[0]["test_distortion"]
    assert sorted(p.name for p in run.images.iterdir()) == [f"image_at_epoch_{e:04d}.png" for e in range(3)]


def test_vq_resume_equals_uninterrupted_bit_for_bit(tmp_path):
    """Restarts happen in both epochs (dead_after 10 of 20 steps), drawn from the checkpointed
    noise generator; the codebook's buffers travel in the weights."""
    straight = train(vq_config(epochs=2, checkpoint_every=7), out=tmp_path / "a", log=quiet)
    resumed = train(vq_config(epochs=1), out=tmp_path / "b", log=quiet)
    train(resume=resumed.path, epochs=2, log=quiet)
    assert straight.metrics()[1]["restarts"] > 0
    drop = ("epoch_seconds", "eval_seconds", "images_per_second")
    assert [{k: v for k, v in m.items() if k not in drop} for m in straight.metrics()] == \
           [{k: v for k, v in m.items() if k not in drop} for m in resumed.metrics()]
    a = load_file(str(straight.checkpoints.latest() / "model.safetensors"))
    b = load_file(str(resumed.checkpoints.latest() / "model.safetensors"))
    assert "codebook.embedding" in a and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    """A vq run trained for 1 epoch (shared by the tests that only read it)."""
    return train(vq_config(epochs=1), out=tmp_path_factory.mktemp("vq") / "run", log=quiet)


def test_prior_resume_equals_uninterrupted_bit_for_bit(vq_run, tmp_path):
    import shutil
    from vaekit import train_prior

    other = tmp_path / "other"
    shutil.copytree(vq_run.path, other)
    straight = train_prior(vq_run.path, epochs=2, log=quiet)
    train_prior(other, epochs=1, log=quiet)
    resumed = train_prior(other, log=quiet, epochs=2)
    assert [m["epoch"] for m in straight.metrics()] == [1, 2]
    assert straight.metrics()[1]["test_prior_nll"] < 49 * torch.log(torch.tensor(32.0)).item()   # below uniform
    drop = ("epoch_seconds",)
    assert [{k: v for k, v in m.items() if k not in drop} for m in straight.metrics()] == \
           [{k: v for k, v in m.items() if k not in drop} for m in resumed.metrics()]
    a = load_file(str(straight.checkpoints.latest() / "model.safetensors"))
    b = load_file(str(resumed.checkpoints.latest() / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in straight.images.iterdir()) == ["image_at_epoch_0001.png", "image_at_epoch_0002.png"]


def test_the_recipe_end_to_end_on_the_sample(tmp_path):
    """configs/mnist-vq.json (its sizes made tiny, one epoch each) through the command line:
    train, the refusals before and without a prior, train-prior, sample, eval, export."""
    import json
    from pathlib import Path

    from conftest import SAMPLE
    recipe = Path(__file__).parents[1] / "configs" / "mnist-vq.json"
    run = tmp_path / "run"
    tiny = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "family"]
    vaekit("train", "--config", recipe, "--data-dir", SAMPLE, "--out", run, "--epochs", 1, "--validation", 500,
           "--device", "cpu", *tiny)
    refused = vaekit("sample", run, check=False)
    assert refused.returncode == 2 and "train its prior first: vaekit train-prior" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    for command in ("traverse", "latent"):
        refused = vaekit(command, run, check=False)
        assert refused.returncode == 2 and "vq model, whose codes are discrete" in refused.stderr
    refused = vaekit("eval", run, "--workers", 2, check=False)
    assert refused.returncode == 2 and "no importance-sampling pass to share out: leave --workers out" in refused.stderr
    vaekit("train-prior", run, "--epochs", 1)
    prior_metrics = [json.loads(line) for line in (run / "prior" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in prior_metrics] == [1]
    assert vaekit("sample", run, "--n", 4).stdout.strip().endswith("prior_n4_seed0.png")
    out = vaekit("eval", run, "--n", 100).stdout
    assert "two-stage bound" in out and "K=1" in out
    entry = json.loads((run / "eval.json").read_text())["dynamic_k1_n100_seed0"]
    assert entry["prior"] == "learned" and entry["elbo"] == pytest.approx(-entry["distortion"] - entry["rate"])
    assert entry["rate"] < 49 * torch.log(torch.tensor(32.0)).item()
    exported = vaekit("export", run).stdout
    assert "codes differing" in exported
    manifest = json.loads((run / "onnx" / "manifest.json").read_text())
    assert manifest["max_abs_diff"] < 1e-4 and manifest["codes_differing"] <= 2   # of 5 x 49: near ties only


def test_vq_resume_after_a_stop_mid_epoch_equals_uninterrupted(tmp_path):
    """A stop at step 10 or later, mid epoch 1 (the codebook's usage counts of the epoch so far
    and the restarts of step 10 in the checkpoint), then a resume: the run of an uninterrupted one."""
    import signal

    from conftest import SAMPLE
    from test_reliability import latest_step, start, wait_for_step

    straight = train(vq_config(epochs=2), out=tmp_path / "straight", log=quiet)
    run = tmp_path / "stopped"
    tiny = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    proc = start("train", "--data-dir", SAMPLE, "--device", "cpu", "--epochs", 2, "--lr", 1e-3,
                 "--checkpoint-every", 1, "--out", run, *tiny)
    wait_for_step(proc, run, 10)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and 10 <= latest_step(run) < 20
    resumed = train(resume=run, log=quiet)
    drop = ("epoch_seconds", "eval_seconds", "images_per_second")
    assert [{k: v for k, v in m.items() if k not in drop} for m in straight.metrics()] == \
           [{k: v for k, v in m.items() if k not in drop} for m in resumed.metrics()]
    a = load_file(str(straight.checkpoints.latest() / "model.safetensors"))
    b = load_file(str(resumed.checkpoints.latest() / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vq_refuses_the_training_settings_only_the_elbo_uses():
    """--warmup-epochs, --kl analytic and --free-bits shape the Gaussian families' ELBO: a vq run
    would ignore them, so a config is refused, also when set by hand after it was made."""
    config = vq_config(warmup_epochs=2.0, kl="analytic", free_bits=0.5)
    with pytest.raises(ConfigError, match="drop --warmup-epochs, --kl analytic, --free-bits$"):
        config.checked_copy()
    with pytest.raises(ConfigError, match="^--kl analytic shapes .* drop --kl analytic$"):
        vq_config(kl="analytic").checked_copy()
    from pathlib import Path
    recipe = Config.load(Path(__file__).parents[1] / "configs" / "mnist-vq.json")
    assert recipe.model.family == "vq" and recipe.train.kl == "sample"
