"""The real `vaekit` entry point, end to end, in a subprocess, on the shipped MNIST sample."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import SAMPLE, cli_env


def vaekit(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "vaekit", *map(str, args)], capture_output=True, text=True,
                            env=cli_env(), timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    result = vaekit("train", "--data-dir", SAMPLE, "--epochs", "2", "--lr", "1e-3", "--device", "cpu",
                    "--out", run)
    return run, result


def test_train_prints_the_seed_lines_and_writes_every_file(trained_run):
    run, result = trained_run
    lines = [line for line in result.stdout.splitlines() if line.startswith("Epoch: ")]
    assert len(lines) == 2 and lines[0].startswith("Epoch: 1, Test set ELBO: -")
    assert "time elapse for current epoch" in lines[0]
    for name in ["config.json", "metrics.jsonl", "fixed_z.safetensors", "training.gif", "checkpoints/latest",
                 "images/image_at_epoch_0000.png", "images/image_at_epoch_0002.png"]:
        assert (run / name).is_file(), name
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    grid = Image.open(run / "images" / "image_at_epoch_0002.png")
    assert grid.mode == "L" and grid.width == grid.height          # the seed's 4x4 grid
    gif = Image.open(run / "training.gif")
    assert gif.n_frames >= 2


def test_generation_commands_write_pngs(trained_run):
    run, _ = trained_run
    out = vaekit("sample", run, "--n", "100", "--device", "cpu").stdout.strip()
    assert Image.open(out).size == (4 * (10 * 30 + 2),) * 2      # 10x10 cells of 28+2 px, enlarged 4x
    rec = vaekit("reconstruct", run, "--n", "8", "--device", "cpu").stdout.strip()
    assert Image.open(rec).size == (4 * (8 * 30 + 2), 4 * (2 * 30 + 2))   # 4 pairs a row, 2 rows
    (run / "training.gif").unlink()
    assert vaekit("gif", run).stdout.strip().endswith("training.gif")
    assert (run / "training.gif").is_file()


def test_resume_via_cli_extends_the_run(trained_run, tmp_path):
    import shutil

    run, _ = trained_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    vaekit("train", "--resume", copy, "--epochs", "3")
    assert [json.loads(line)["epoch"] for line in (copy / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("args, message", [
    (["sample", "{tmp}"], "not a vaekit run directory"),
    (["train", "--out", "{run}", "--epochs", "1"], "already holds a run"),
    (["train", "--latent-dim", "0", "--out", "{tmp}/x"], "latent_dim"),
    (["train", "--epochs", "-1", "--out", "{tmp}/x"], "epochs"),
    (["train", "--binarization", "fuzzy", "--out", "{tmp}/x"], "binarization"),
    (["train", "--resume", "{run}", "--latent-dim", "3"], "only --epochs"),
    (["sample", "{run}", "--n", "0"], "--n"),
    (["sample", "{run}", "--n", "5000000"], "--n 5000000 makes a grid of 5000000 images, over vaekit's limit of 2500"),
    (["reconstruct", "{run}", "--n", "2000"], "makes a grid of 4000 images, over vaekit's limit"),
    (["interpolate", "{run}", "--steps", "100000"], "--steps 100000 (two paths, framed by their ends) makes a grid"),
    (["traverse", "{run}", "--dims", "50", "--steps", "100"], "--dims 50 x --steps 100 makes a grid of 5000"),
    (["inpaint", "{run}", "--chains", "100000"], "--chains 100000 is over vaekit's limit of 1000"),
    (["eval", "{run}", "--decode-batch", "1000000000"], "--decode-batch 1000000000 is over vaekit's limit of 1000000"),
    (["train", "--resume", "{run}", "--data-dir", "{tmp}/nowhere", "--epochs", "3"], "does not exist"),
    (["train", "--out", "{tmp}/x", "--fall-back"], "--fall-back applies to --resume RUN only"),
    (["train", "--nproc", "2", "--batch-size", "1", "--out", "{tmp}/x"],      # said once, before torchrun starts
     "batch_size 1 (the global batch) is smaller than the 2 processes; raise --batch-size"),
])
def test_bad_input_gets_one_line(trained_run, tmp_path, args, message):
    run, _ = trained_run
    result = vaekit(*[a.format(tmp=tmp_path, run=run) for a in args], check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("vaekit: error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["sample", "RUN", "--device", "gpu"], ["trian"], ["train", "--epochs", "many"],
                                  ["sample", "RUN", "--out", "x.txt"],
                                  ["inpaint", "RUN", "--score-n", "many"], ["sample", "RUN", "--seed", str(2**64)],
                                  ["eval", "RUN", "--seed", "1e16"], ["latent", "RUN", "--seed", "-1"],
                                  ["sample", "RUN", "--nn", "5"]])
def test_usage_mistakes_are_one_line_too(args):
    result = vaekit(*args, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "error: " in result.stderr
    command = "vaekit" if args == ["trian"] else f"vaekit {args[0]}"    # the help of the command that was given
    assert result.stderr.startswith(f"{command}: error: ") and f"see `{command} --help`" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "epochs must be >= 1, got 0: fix --epochs"),
    (["--nproc", "1000", "--device", "cpu"], f"--nproc 1000 is more than the {len(os.sched_getaffinity(0))} cores "
     f"this process may use: pass at most {len(os.sched_getaffinity(0))}"),
    (["--max-restarts", "-1", "--nproc", "2"], "--max-restarts must be at least 0, got -1"),
    (["--max-restarts", "1"], "--max-restarts applies to --nproc N only"),
    (["--beta", "-1"], "beta must be > 0, got -1.0: fix --beta"),
    (["--likelihood", "gaussian-fixed", "--fixed-scale", "0"], "fixed_scale must be > 0, got 0.0: fix --fixed-scale"),
    (["--num-classes", "-1"], "num_classes must be >= 0 (0: the data's), got -1: fix --num-classes"),
    (["--num-classes", "10"], "num_classes 10 is for conditional models: pass --conditional or drop --num-classes"),
    (["--stochastic-layers", "-1"], "stochastic_layers must be >= 0 (0: the family's own), got -1: fix "
     "--stochastic-layers"),
    (["--family", "vq", "--ema-decay", "2"], "ema_decay must be in [0, 1), got 2.0: fix --ema-decay"),
    (["--family", "vq", "--commitment", "-1"], "commitment must be >= 0, got -1.0: fix --commitment"),
    (["--family", "vq", "--prior-heads", "3"], "prior_heads 3 does not divide prior_width 128: fix --prior-heads"),
    (["--family", "vq", "--hidden-channels", "7"], "hidden_channels must be even, got 7: fix --hidden-channels"),
    (["--family", "vq", "--res-blocks", "-1"], "res_blocks must be >= 0, got -1: fix --res-blocks"),
])
def test_a_bad_train_flag_is_named_alone_in_one_line_before_anything_starts(tmp_path, capsys, args, message):
    """Refused by the command line itself (in this process: nothing is read, started or made first),
    each setting on its own, named by its flag."""
    from vaekit.cli import main

    assert main(["train", "--data-dir", str(SAMPLE), *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vaekit: error: ") and message in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--nproc 2 takes 2 cores")
def test_nproc_states_the_threads_per_process_in_one_line_without_torchruns_banner(tmp_path):
    env = cli_env()
    env.pop("OMP_NUM_THREADS", None)            # what torchrun would print its banner about
    # the ranks start, then refuse the batch (larger than the sample): the launch and no training
    result = subprocess.run([sys.executable, "-m", "vaekit", "train", "--nproc", "2", "--batch-size", "5000",
                             "--data-dir", str(SAMPLE), "--device", "cpu", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and "vaekit: rank " in result.stderr, result.stderr
    assert "larger than the 2000 training images" in result.stderr and not (tmp_path / "run").exists()
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    said = [line for line in result.stderr.splitlines() if line.startswith("vaekit: 2 processes")]
    assert said == [f"vaekit: 2 processes, {threads} thread{'s' * (threads > 1)} each: "
                    f"{len(os.sched_getaffinity(0))} cores shared out (set OMP_NUM_THREADS to choose)"]
    assert "OMP_NUM_THREADS environment variable" not in result.stderr and "*****" not in result.stderr
