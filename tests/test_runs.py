"""The run directory (runs.py) and opening a run (loading.py), each case made with the real
command on a trained run: where a new run may go, what a failed start leaves, resuming, which data
a command may score, where commands write, and eval.json's entries."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import SAMPLE
from real_runs import assert_one_line_error, assert_same_run, run_copy, vaekit
from vaekit import Run, RunError, eval_to_json, sample_to_png
from vaekit.runs import kept_file, parse_run_name
from vaekit.cli import main
from vaekit.data import read_idx, write_idx
from vaekit.data.sources import FILES


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "2001"], "larger than the 2000 training images"),
    (["--checkpoint-every", "-1"], "checkpoint_every must be >= 0"),
    (["--keep-checkpoints", "0"], "keep_checkpoints must be >= 1"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--nproc", "0"], "--nproc must be at least 1"),
    (["--out", "{file}/run"], "cannot write the run directory"),
    (["--out", "{file}"], "a-file is a file, not a folder; choose a new folder for --out"),
])
def test_out_of_range_arguments_are_one_line(tmp_path, capsys, args, message):
    file = tmp_path / "a-file"
    file.write_text("not a directory")
    argv = ["train", "--data-dir", str(SAMPLE), "--device", "cpu", "--epochs", "1", *args]
    if "--out" not in args:
        argv += ["--out", str(tmp_path / "run")]
    assert main([a.format(file=file) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in assert_one_line_error(subprocess.CompletedProcess([], 2, "", err)), err


def test_fewer_epochs_than_done_is_refused_and_leaves_the_config(reference, tmp_path, capsys):
    run, _ = run_copy(reference, tmp_path)
    before = (run / "config.json").read_text()
    assert main(["train", "--resume", str(run), "--epochs", "1"]) == 2
    assert "--epochs 1 is fewer than the 2 epochs" in capsys.readouterr().err
    assert (run / "config.json").read_text() == before


def other_data(tmp_path):
    """The sample with one pixel of one test image changed."""
    other = tmp_path / "other"
    other.mkdir()
    for fname in FILES.values():
        array = read_idx(SAMPLE / fname)
        if fname.startswith("t10k-images"):
            array[0, 14, 14] ^= 1
        write_idx(other / fname, array)
    return other


def test_resume_takes_data_dir_again_only_for_the_same_data_and_a_failed_resume_keeps_config(reference, tmp_path):
    run, _ = run_copy(reference, tmp_path)
    config = (run / "config.json").read_text()
    other = other_data(tmp_path)
    error = assert_one_line_error(vaekit("train", "--resume", run, "--data-dir", other, "--epochs", "3"))
    assert f"{other} does not hold the data {run} was trained on" in error and "pass --data-dir" in error
    assert (run / "config.json").read_text() == config
    moved = tmp_path / "moved"
    shutil.copytree(SAMPLE, moved)
    result = vaekit("train", "--resume", run, "--data-dir", moved, "--epochs", "3")
    assert result.returncode == 0, result.stderr
    saved = Run(run).config()
    assert saved.data.data_dir == str(moved) and saved.train.epochs == 3
    assert [m["epoch"] for m in Run(run).metrics()] == [1, 2, 3]


# --- runs lost or left broken ----------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "5000"], "larger than the 2000 training images"),
    (["--image-size", "32"], "pass --image-channels 1 --image-size 28"),
    (["--data-dir", "{tmp}/nowhere"], "does not exist"),
    (["--lr", "1e6"], "training diverged and stopped (no checkpoint was written)"),
])
def test_a_failed_start_leaves_no_run_directory_so_the_retry_is_not_refused(tmp_path, args, message):
    run, empty = tmp_path / "run", tmp_path / "empty"
    empty.mkdir()
    for out in (run, empty):
        argv = ["train", "--data-dir", SAMPLE, "--device", "cpu", "--epochs", "1", "--out", out, *args]
        assert message in assert_one_line_error(vaekit(*[str(a).format(tmp=tmp_path) for a in argv]))
    assert not run.exists() and list(empty.iterdir()) == []    # a folder that was there, empty, stays
    if "diverged" in message:      # the one failure after the run directory was made: the retry trains
        result = vaekit("train", "--data-dir", SAMPLE, "--device", "cpu", "--epochs", "1", "--out", run)
        assert result.returncode == 0, result.stderr


def test_resuming_a_finished_run_says_so_and_changes_nothing(reference, tmp_path):
    run, _ = run_copy(reference, tmp_path)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    result = vaekit("train", "--resume", run)
    assert result.returncode == 0, result.stderr
    assert f"Nothing to do: {run} has done its 2 epochs" in result.stdout and "epochs 3..2" not in result.stdout
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == files


def test_a_run_without_checkpoints_points_to_the_command_that_trains_it(reference, tmp_path):
    run, _ = run_copy(reference, tmp_path)
    shutil.rmtree(run / "checkpoints")
    error = assert_one_line_error(vaekit("sample", run, "--device", "cpu"))
    assert f"`vaekit train --resume {run}`" in error
    result = vaekit("train", "--resume", run)      # the command it names is not refused
    assert result.returncode == 0, result.stderr
    assert_same_run(run, reference)


def test_eval_checks_it_can_write_before_the_work_and_prints_its_result_before_writing(reference, tmp_path):
    run, _ = run_copy(reference, tmp_path)
    (run / "eval.json").mkdir()
    result = vaekit("eval", run, "--k", "2", "--device", "cpu")
    assert f"cannot write {run / 'eval.json'}: it is a folder" in assert_one_line_error(result)
    assert result.stdout == ""                                   # refused before the work
    (run / "eval.json").rmdir()
    limit = 512   # bytes per file: eval.json (about 2 kB) does not fit, as on a full disk
    script = f"import resource, sys\nresource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))"
    result = vaekit("eval", run, "--k", "2", "--device", "cpu", script=script)
    error = assert_one_line_error(result)
    assert f"cannot write {run / 'eval.json'}: File too large; the result is not saved" in error
    assert "NLL" in result.stdout and "test ELBO" in result.stdout   # the table came first
    assert sorted(p.name for p in run.iterdir() if "eval" in p.name) == [".eval.lock"]   # no part of eval.json
    (run / "eval.json").write_text('{"static": {"k": 5000, "iwae')    # damaged: kept aside, not overwritten
    assert vaekit("eval", run, "--k", "2", "--device", "cpu", "--precision", "fp32").returncode == 0
    assert json.loads((run / "eval.json").read_text())["static_k2_n500_seed0_fp32"]["k"] == 2
    assert (run / "eval.json.unreadable").read_text() == '{"static": {"k": 5000, "iwae'


def test_what_commands_make_of_run_at_best_goes_under_run_best(reference, tmp_path):
    run, _ = run_copy(reference, tmp_path)
    store = Run(run).checkpoints
    older = load_file(str(store.path / "epoch_0001" / "model.safetensors"))
    store.save_best(older, 1, -200.0)
    png = sample_to_png(f"{run}@best", n=4, device="cpu")
    assert png == run / "best" / "samples" / "prior_n4_seed0.png" and png.is_file()
    assert png.read_bytes() != sample_to_png(run, n=4, device="cpu").read_bytes()   # epoch 1's weights, not 2's
    record = eval_to_json(f"{run}@best", k=2, n=20, device="cpu", precision="fp32")
    assert json.loads((run / "best" / "eval.json").read_text()) == {
        "static_k2_n20_seed0_fp32": {**record, "data": Run(run).data_fingerprint()}}
    assert not (run / "eval.json").exists()


@pytest.mark.parametrize("command, message", [
    (["sample", "--out", "{file}/x.png"], "{file}: File exists"),
    (["gif"], "{run}/training.gif: Is a directory"),        # (training.gif made a folder)
    (["gif"], "{run}/images/image_at_epoch_0001.png is not a readable PNG (not an image); delete or replace it and "
              "run again"),                             # (the epoch image made a text file)
    (["interpolate", "--out", "{file}/x.png"], "{file}: File exists"),
])
def test_an_unwritable_output_or_an_unreadable_epoch_image_is_one_line(reference, tmp_path, command, message):
    run, _ = run_copy(reference, tmp_path)
    file = tmp_path / "a-file"
    file.write_text("not a folder")
    if "Is a directory" in message:
        (run / "training.gif").unlink()
        (run / "training.gif").mkdir()
    if "not a readable PNG" in message:
        (run / "images" / "image_at_epoch_0001.png").write_text("not a picture")
    gif = (run / "training.gif").read_bytes() if (run / "training.gif").is_file() else None
    argv = [command[0], run, *[a.format(file=file) for a in command[1:]]]
    argv += [] if command == ["gif"] else ["--device", "cpu"]
    error = assert_one_line_error(vaekit(*argv))
    assert message.format(file=file, run=run) in error
    if gif is not None:
        assert (run / "training.gif").read_bytes() == gif


# --- input not yet validated ----------------------------------------------------------------


@pytest.mark.parametrize("part, key, value, message", [
    ("model", "latent_dim", 50.7, "model: latent_dim must be an integer, got 50.7"),
    ("model", "latent_dim", "fifty", 'model: latent_dim must be an integer, got "fifty"'),
    ("train", "epochs", True, "train: epochs must be an integer, got true"),
])
def test_a_config_value_of_the_wrong_type_is_one_line(reference, tmp_path, part, key, value, message):
    run, _ = run_copy(reference, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config[part][key] = value
    (run / "config.json").write_text(json.dumps(config))
    for command in (["sample", run, "--device", "cpu"], ["train", "--resume", run]):
        assert f"{run / 'config.json'}: {message}" in assert_one_line_error(vaekit(*command))



# --- where a new run may go --------------------------------------------------------------------


@pytest.mark.parametrize("inside", ["checkpoints/epoch_0003", "images", "new/run"])
def test_a_new_run_inside_another_run_is_refused(reference, inside):
    before = sorted(p for p in reference.rglob("*"))
    error = assert_one_line_error(vaekit("train", "--data-dir", SAMPLE, "--device", "cpu", "--epochs", "1",
                                         "--out", reference / inside))
    assert f"is inside the run {reference.absolute()}; choose an --out outside it" in error
    assert sorted(p for p in reference.rglob("*")) == before


def test_the_files_a_run_keeps_are_known_by_name_and_another_tools_project_is_no_run(reference, tmp_path):
    for kept in ("metrics.jsonl.before-restart", "eval.json.unreadable.2", "images/x.png", "best/eval.json"):
        assert kept_file(reference / kept) is not None, kept
    for free in ("images.png", "samples/x.png", "best/x.png", "mine/training.gif"):
        assert kept_file(reference / free) is None, free
    project = tmp_path / "project"              # a config.json and checkpoints/ of another tool's
    (project / "checkpoints").mkdir(parents=True)
    (project / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    assert kept_file(project / "images" / "grid.png") is None
    assert kept_file(project / "run" / "images" / "grid.png") is None


def test_a_new_run_on_a_run_points_to_resume_and_on_other_files_does_not(reference, tmp_path):
    error = assert_one_line_error(vaekit("train", "--data-dir", SAMPLE, "--device", "cpu", "--out", reference))
    assert f"{reference} already holds a run: resume it with `vaekit train --resume {reference}`" in error
    (tmp_path / "notes.txt").write_text("mine")
    error = assert_one_line_error(vaekit("train", "--data-dir", SAMPLE, "--device", "cpu", "--out", tmp_path))
    assert "already exists and is not empty; choose a new or empty folder" in error and "--resume" not in error


# --- which data a command scores, and eval.json ----------------------------------------------------

EVAL = ["--k", "1", "--n", "5", "--decode-batch", "8", "--device", "cpu", "--precision", "fp32"]


def test_commands_refuse_data_other_than_the_runs_and_eval_json_names_the_data_scored(reference, tmp_path):
    run, _ = run_copy(reference, tmp_path)
    other = other_data(tmp_path)
    for command in (["eval", run, *EVAL], ["reconstruct", run, "--device", "cpu"]):
        error = assert_one_line_error(vaekit(*command, "--data-dir", other))
        assert f"{other} does not hold the data {run} was trained on" in error and "pass --data-dir" in error
    assert not (run / "eval.json").exists() and not (run / "samples").exists()
    moved = tmp_path / "moved"                   # the same data elsewhere is scored
    shutil.copytree(SAMPLE, moved)
    assert vaekit("eval", run, *EVAL, "--data-dir", moved).returncode == 0
    [entry] = json.loads((run / "eval.json").read_text()).values()
    assert entry["data"] == Run(run).data_fingerprint() == json.loads((run / "data.json").read_text())


def test_eval_entries_are_kept_per_seed_and_older_keys_are_read(reference, tmp_path, capsys):
    run, _ = run_copy(reference, tmp_path)
    assert main(["eval", str(run), *EVAL]) == 0
    seed0 = json.loads((run / "eval.json").read_text())["static_k1_n5_seed0_fp32"]
    older = {k: v for k, v in seed0.items() if k != "precision"}                # as an older vaekit saved it
    (run / "eval.json").write_text(json.dumps({"static_k1_n5": older}))        # and keyed it
    assert main(["eval", str(run), *EVAL, "--seed", "7"]) == 0
    entries = json.loads((run / "eval.json").read_text())
    assert sorted(entries) == ["static_k1_n5_seed0", "static_k1_n5_seed7_fp32"]
    assert entries["static_k1_n5_seed0"] == older and entries["static_k1_n5_seed7_fp32"]["seed"] == 7


def test_a_run_is_named_as_run_run_at_best_or_a_shipped_model(tmp_path):
    run = parse_run_name(tmp_path / "run")
    assert (run.path, run.best, run.shipped, run.out) == (tmp_path / "run", False, None, tmp_path / "run")
    best = parse_run_name(f"{tmp_path / 'run'}@best")
    assert (best.path, best.best, best.out) == (tmp_path / "run", True, tmp_path / "run" / "best")
    shipped = parse_run_name("pretrained:mnist")
    assert shipped.shipped == "mnist" and (shipped.path / "config.json").is_file()
    assert shipped.out == Path("pretrained-mnist")
    with pytest.raises(RunError, match="pretrained:nope is not a model shipped with vaekit .shipped: pretrained:mnist"):
        parse_run_name("pretrained:nope")
