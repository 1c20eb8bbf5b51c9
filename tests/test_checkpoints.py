"""The checkpoint store of a run (checkpoints.py), each fault made for real on a trained run: damaged,
truncated, foreign or pickled checkpoints are refused in one line by every command, a flipped bit
is caught by the recorded SHA-256, a resume goes on from the newest complete checkpoint whatever
`latest` says, and checkpoint files have the mode of the rest of the run."""
import hashlib
import json
import os
import stat
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from real_runs import TRAIN, assert_one_line_error, assert_same_run, run_copy, start, vaekit, wait_for_step
from vaekit import Run
from vaekit.checkpoints import CHECKPOINT_FILES
from vaekit.cli import main

def foreign_weights(ckpt):   # another model's weights: latent 2 instead of 50
    from vaekit import ConvVAE, ModelConfig
    save_file({k: v.contiguous() for k, v in ConvVAE(ModelConfig(latent_dim=2)).state_dict().items()},
              str(ckpt / "model.safetensors"))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def intact(change):
    """`change` made to a checkpoint whose checksums are then recorded again: a foreign checkpoint
    (another model's, another device's, an older vaekit's) rather than a damaged one."""
    def make(ckpt):
        change(ckpt)
        (ckpt / "SHA256SUMS").write_text("".join(f"{hashlib.sha256((ckpt / f).read_bytes()).hexdigest()}  {f}\n"
                                                 for f in CHECKPOINT_FILES))
    return make


def unsummed(change):
    """`change` made to a checkpoint written before vaekit recorded checksums."""
    def make(ckpt):
        (ckpt / "SHA256SUMS").unlink()
        change(ckpt)
    return make


DAMAGED = "epoch_0002/{} is damaged (its SHA-256 differs from the one recorded when it was written)"
DAMAGE = {
    "truncated weights": (lambda ckpt: truncate(ckpt / "model.safetensors"), DAMAGED.format("model.safetensors")),
    "garbage optimizer": (lambda ckpt: (ckpt / "optimizer.safetensors").write_bytes(os.urandom(4096)),
                          DAMAGED.format("optimizer.safetensors")),
    "truncated state": (lambda ckpt: truncate(ckpt / "state.json"), DAMAGED.format("state.json")),
    "damaged checksums": (lambda ckpt: truncate(ckpt / "SHA256SUMS"), "SHA256SUMS is damaged (it records no"),
    "missing rng": (lambda ckpt: (ckpt / "rng.safetensors").unlink(), "epoch_0002/rng.safetensors is missing"),
    "foreign state": (intact(lambda ckpt: (ckpt / "state.json").write_text("[1, 2]")), "is damaged (TypeError"),
    "wrong shapes": (intact(foreign_weights), "do not fit its config.json"),
    "rng of another device": (intact(lambda ckpt: save_file({k: torch.zeros(3, dtype=torch.uint8) for k in
                                                             ("torch", "order", "noise")},
                                                            str(ckpt / "rng.safetensors"))),
                              "does not fit this run"),
    "truncated weights of an older vaekit": (unsummed(lambda ckpt: truncate(ckpt / "model.safetensors")),
                                             "not a safetensors file"),
    "unknown config key": (lambda ckpt: (ckpt.parent.parent / "config.json").write_text(
        json.dumps({"train": {"epochs": 3, "warp_speed": 9}})), "unknown key(s) warp_speed"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_or_foreign_checkpoint_is_one_line(reference, tmp_path, capsys, damage):
    run, ckpt = run_copy(reference, tmp_path)
    make, message = DAMAGE[damage]
    make(ckpt)
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert message in assert_one_line_error(subprocess.CompletedProcess([], 2, "", err)), err


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickled_checkpoint_is_refused_without_running_it(reference, tmp_path, capsys):
    run, ckpt = run_copy(reference, tmp_path)
    marker = tmp_path / "pwned"
    intact(lambda ckpt: torch.save({"weights": _Exploit(marker)}, ckpt / "model.safetensors"))(ckpt)  # what a
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 2                     # torch.load would run
    assert "not a safetensors file" in capsys.readouterr().err
    assert not marker.exists()


# --- silent wrong results: damaged checkpoints, a wrong `latest`, other data ------------------


def flip_a_bit(path):
    """One bit of the tensor data in the middle of a safetensors file changed, as a bad disk does."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")     # after the length and the JSON header
    data[(start + len(data)) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_bit_is_refused_by_every_command_and_fall_back_goes_on_only_when_asked(reference, tmp_path):
    run, ckpt = run_copy(reference, tmp_path)
    flip_a_bit(ckpt / "model.safetensors")
    damaged = (ckpt / "model.safetensors").read_bytes()
    for command in (["sample", run, "--device", "cpu"], ["eval", run, "--k", "2", "--device", "cpu"],
                    ["train", "--resume", run, "--epochs", "3"]):
        error = assert_one_line_error(vaekit(*command))
        assert f"checkpoint file {ckpt / 'model.safetensors'} is damaged" in error, command
        assert f"--resume {run} --fall-back` goes on from the newest intact checkpoint, epoch_0001" in error
    assert not (run / "eval.json").exists() and not (run / "samples").exists()
    assert Run(run).config().train.epochs == 2             # the refused resume left config.json alone
    result = vaekit("train", "--resume", run, "--fall-back")
    assert result.returncode == 0, result.stderr
    assert f"set epoch_0002 aside as {run / 'checkpoints' / 'set-aside' / 'epoch_0002'}" in result.stderr
    assert f"Resuming {run} from epoch_0001" in result.stdout
    assert (run / "checkpoints" / "set-aside" / "epoch_0002" / "model.safetensors").read_bytes() == damaged
    assert_same_run(run, reference)                        # epoch 2 trained again, as it was the first time


@pytest.mark.parametrize("pointer", ["missing", "garbage", "older"])
def test_resume_goes_on_from_the_newest_complete_checkpoint_whatever_latest_says(reference, tmp_path, pointer):
    run = tmp_path / "run"
    proc = start("train", *TRAIN, "--out", run)
    wait_for_step(proc, run, 25)
    proc.kill()
    proc.communicate()
    latest = run / "checkpoints" / "latest"
    newest = latest.read_text().strip()
    if pointer == "missing":
        latest.unlink()
    else:
        latest.write_text("../../../etc\n" if pointer == "garbage" else "epoch_0001\n")
    sample = vaekit("sample", run, "--device", "cpu")
    assert sample.returncode == 0, sample.stderr
    result = vaekit("train", "--resume", run)
    assert result.returncode == 0, result.stderr
    assert f"Resuming {run} from {newest} (step {int(newest[5:]) if newest.startswith('step') else 20}" in result.stdout
    assert not (run / "checkpoints" / "set-aside").exists()
    assert_same_run(run, reference)

def test_checkpoint_files_have_the_mode_of_the_rest_of_the_run(reference):
    mode = stat.S_IMODE((reference / "config.json").stat().st_mode)
    files = [p for p in (reference / "checkpoints").rglob("*") if p.is_file()]
    assert len(files) > 5
    assert {stat.S_IMODE(p.stat().st_mode) for p in [*files, reference / "fixed_z.safetensors"]} == {mode}



def test_keep_every_keeps_those_epochs_whose_weights_run_at_epoch_n_reads(tmp_path, capsys):
    from conftest import sample_config
    from vaekit import eval_to_json, train
    from vaekit.errors import ConfigError
    from vaekit.files import sha256

    run = train(sample_config(epochs=5, keep_checkpoints=1, keep_every=2, batch_size=100), out=tmp_path / "run",
                log=lambda *_: None).path
    assert sorted(p.name for p in (run / "checkpoints").glob("epoch_*")) == ["epoch_0002", "epoch_0004", "epoch_0005"]
    record = eval_to_json(f"{run}@epoch_2", k=1, n=5, device="cpu", precision="fp32")
    assert record["weights_sha256"] == sha256(run / "checkpoints" / "epoch_0002" / "model.safetensors")
    assert (run / "epoch_0002" / "eval.json").is_file() and not (run / "eval.json").exists()   # beside the run's own
    newest = eval_to_json(run, k=1, n=5, device="cpu", precision="fp32")
    assert newest["weights_sha256"] == sha256(run / "checkpoints" / "epoch_0005" / "model.safetensors")
    capsys.readouterr()
    assert main(["eval", f"{run}@epoch_3", "--k", "1", "--n", "5", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (f"vaekit: error: {run} keeps no checkpoint of epoch 3 (it keeps epochs: 2, 4, 5); "
                                       "`vaekit train --keep-every N` keeps every Nth epoch's\n")
    with pytest.raises(ConfigError, match="without @epoch_2"):
        train(resume=f"{run}@epoch_2", log=lambda *_: None)
