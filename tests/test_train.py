"""Real training runs on the shipped MNIST sample, through the library's own entry point."""
import copy
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import sample_config
from vaekit import Run, train
from vaekit.config import SEED_LIMIT
from vaekit.errors import ConfigError, RunError
from vaekit.runs import BEST_SUFFIX
from vaekit.viz import seed_gif_frames


def quiet(*_):
    pass


def final_weights(run: Run) -> dict:
    return load_file(str(run.checkpoints.latest() / "model.safetensors"))


def test_short_run_improves_test_elbo_and_writes_everything(tmp_path):
    run = train(sample_config(epochs=3, lr=1e-3), out=tmp_path / "run", log=quiet)
    metrics = run.metrics()
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    elbos = [m["test_elbo"] for m in metrics]
    assert elbos[0] < elbos[1] < elbos[2], elbos
    assert elbos[-1] > -250          # an untrained model sits near -540 nats
    timing = {"epoch_seconds", "eval_seconds", "images_per_second"}
    assert all(set(m) == {"epoch", "step", "train_loss", "lr", "test_elbo", "test_distortion", "test_rate", *timing}
               for m in metrics), metrics    # the names docs/files.md, plot and TensorBoard read
    assert [m["step"] for m in metrics] == [20, 40, 60]     # 2,000 images in batches of 100
    for m in metrics:   # the seed's estimator and the analytic parts describe the same bound
        assert m["test_rate"] > 0 and m["test_distortion"] > 0
        assert abs(m["test_elbo"] + m["test_distortion"] + m["test_rate"]) < 10
    assert sorted(p.name for p in run.images.iterdir()) == [f"image_at_epoch_{e:04d}.png" for e in range(4)]
    assert run.gif_path.stat().st_size > 0
    assert json.loads(run.config_path.read_text())["train"]["epochs"] == 3
    assert run.fixed_z().shape == (16, 50)
    assert (run.checkpoints.path / "latest").read_text().strip() == "epoch_0003"
    assert sorted(p.name for p in run.checkpoints.path.glob("epoch_*")) == ["epoch_0002", "epoch_0003"]


def test_same_seed_same_metrics_and_resume_equals_uninterrupted(tmp_path):
    straight = train(sample_config(epochs=3, batch_size=64), out=tmp_path / "a", log=quiet)
    again = train(sample_config(epochs=3, batch_size=64), out=tmp_path / "b", log=quiet)
    resumed = train(sample_config(epochs=1, batch_size=64), out=tmp_path / "c", log=quiet)
    train(resume=resumed.path, epochs=3, log=quiet)

    def numbers(run):
        return [(m["epoch"], m["step"], m["train_loss"], m["test_elbo"]) for m in run.metrics()]

    assert numbers(straight) == numbers(again) == numbers(resumed)
    a, c = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_resume_drops_metrics_written_after_the_checkpoint_and_without_one_keeps_them_aside(tmp_path, capsys):
    run = train(sample_config(epochs=1), out=tmp_path / "run", log=quiet)
    run.append_metrics({"epoch": 2, "step": 999, "train_loss": 0.0, "test_elbo": 0.0})  # as a crash would leave
    train(resume=run.path, epochs=2, log=quiet)
    assert [m["epoch"] for m in run.metrics()] == [1, 2]
    assert run.metrics()[1]["step"] != 999
    with pytest.raises(ConfigError, match="epochs must be >= 1, got 0: fix --epochs"):
        train(resume=run.path, epochs=0, log=quiet)
    # no checkpoint (deleted, or a run killed before its first): trained again from epoch 1, saying so
    # in one line, the lines of the training before kept aside rather than dropped
    before = run.metrics_path.read_text()
    shutil.rmtree(run.checkpoints.path)
    capsys.readouterr()
    train(resume=run.path, epochs=1, log=quiet)
    aside = run.path / "metrics.jsonl.before-restart"
    assert (f"warning: {run.path} has no checkpoint to resume from: training it from epoch 1; its metrics.jsonl "
            f"lines are kept in {aside}") in capsys.readouterr().err.splitlines()
    assert aside.read_text() == before and [m["epoch"] for m in run.metrics()] == [1]
    assert run.checkpoints.latest().name == "epoch_0001"


def test_existing_run_directory_is_never_overwritten(tmp_path):
    run = train(sample_config(epochs=1), out=tmp_path / "run", log=quiet)
    before = run.metrics_path.read_bytes()
    with pytest.raises(RunError, match="already holds a run"):
        train(sample_config(epochs=1), out=run.path, log=quiet)
    assert run.metrics_path.read_bytes() == before


def test_batch_larger_than_data_is_refused(tmp_path):
    with pytest.raises(RunError, match="batch_size"):
        train(sample_config(epochs=1, batch_size=5000), out=tmp_path / "run", log=quiet)


def test_gif_frames_follow_the_seed():
    paths = [f"image_at_epoch_{i:04d}.png" for i in range(11)]
    # 2*sqrt(i) for i = 0..10 rounds to 0 2 3 3 4 4 5 5 6 6 6: a frame is kept where that grows,
    # then the seed appends the last image once more
    expected = [0, 1, 2, 4, 6, 8, 10]
    kept = [int(p[15:19]) for p in seed_gif_frames(paths)]
    assert kept == expected


def test_a_restored_optimizer_state_takes_its_parameters_memory_layout(tmp_path):
    """Checkpoints store optimizer moments contiguous; the fused Adam pairs them with parameters
    and gradients by memory position, so restore must give them the parameters' (channels_last)
    layout. A contiguous moment beside a channels_last weight would silently scramble the update."""
    from vaekit.models import ModelConfig, build_model

    run = train(sample_config(epochs=1), out=tmp_path / "run", log=quiet)
    model = build_model(ModelConfig()).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    generators = {name: torch.Generator() for name in ("torch", "order", "noise")}
    run.checkpoints.load().restore(model, optimizer, generators, run.checkpoints.latest())
    conv_weights = [p for p in model.parameters() if p.dim() == 4]
    assert any(not p.is_contiguous() for p in conv_weights)    # channels_last, really
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert optimizer.state[p][key].stride() == p.stride(), key


def test_train_leaves_the_callers_config_as_it_was(tmp_path):
    config = sample_config(epochs=1, batch_size=250)
    config.model.conditional = True          # num_classes 0: the run learns 10 from the data
    before = copy.deepcopy(config)
    run = train(config, out=tmp_path / "run", log=quiet)
    assert config == before
    assert run.config().model.num_classes == 10
    train(resume=run.path, epochs=2, log=quiet)
    assert config == before and run.config().train.epochs == 2


def test_the_largest_seed_trains_and_scores_an_epoch_with_every_held_out_number(tmp_path):
    config = sample_config(epochs=1, batch_size=250, seed=SEED_LIMIT, skip_grad=1e6)
    config.data.validation = 200
    config.data.binarization = "dynamic"
    config.model.objective = "iwae"
    config.model.iwae_k = 2
    run = train(config, out=tmp_path / "run", log=quiet)
    [m] = run.metrics()
    assert set(m) == {"epoch", "step", "train_loss", "lr", "epoch_seconds", "eval_seconds", "images_per_second",
                      "test_elbo", "test_distortion", "test_rate", "test_iwae_bound_k2",
                      "val_elbo", "val_distortion", "val_rate", "skipped_updates"}
    assert (m["epoch"], m["step"], m["skipped_updates"]) == (1, 8, 0)      # 1,800 images in batches of 250
    assert all(math.isfinite(m[key]) for key in m)
    assert m["test_iwae_bound_k2"] >= m["test_elbo"] - 5       # a K=2 bound sits at or above the ELBO, up to noise
    assert (run.checkpoints.path / "latest").read_text().strip() == "epoch_0001"


def test_resume_of_run_at_best_names_the_run_to_resume(tmp_path):
    with pytest.raises(ConfigError, match=f"pass {tmp_path / 'run'} without {BEST_SUFFIX}"):
        train(resume=f"{tmp_path / 'run'}{BEST_SUFFIX}", log=quiet)


def test_a_setting_made_by_hand_is_checked_as_a_config_file_is(tmp_path):
    config = sample_config(epochs=1, seed=SEED_LIMIT + 1)     # set on the dataclass, past its own check
    with pytest.raises(ConfigError, match=f"--seed must be an integer from 0 to {SEED_LIMIT}"):
        train(config, out=tmp_path / "run", log=quiet)
    assert not (tmp_path / "run").exists() and config.train.seed == SEED_LIMIT + 1
