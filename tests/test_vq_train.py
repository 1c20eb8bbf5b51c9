"""The vq family through vaekit's own entry points on the MNIST sample: training (its metrics,
exact resume with the codebook's buffers and restarts), the prior's stage, and the tools."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import sample_config
from vaekit import train

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
