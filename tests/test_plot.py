"""Pictures of training: `vaekit plot` (matplotlib) and `vaekit train --tensorboard`, on runs trained
briefly on the shipped MNIST sample, each read back from what it wrote."""
import io
import json
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import sample_config
from test_cli import vaekit
from vaekit import ConfigError, Run, plot_runs, train
from vaekit.cli import main
from vaekit.plot import curves_figure, wall_minutes

pytest.importorskip("matplotlib", reason="the plot extra is not installed: pip install -e '.[test]'")


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of 2 epochs (8 steps each) that differ in their learning rate."""
    root = tmp_path_factory.mktemp("plot")
    return [train(sample_config(epochs=2, batch_size=250, lr=lr), out=root / f"lr{lr}", log=quiet).path
            for lr in (1e-3, 3e-3)]


def lines_of(ax) -> list[tuple[list, list, str]]:
    return [(list(line.get_xdata()), list(line.get_ydata()), line.get_linestyle()) for line in ax.get_lines()]


def test_each_panel_draws_every_runs_metrics_against_epoch_and_time(runs):
    fig = curves_figure(runs)
    axes = np.array(fig.axes).reshape(3, 2)
    for row, key in zip(axes, ("test_elbo", "test_rate", "test_distortion")):
        by_epoch, by_time = lines_of(row[0]), lines_of(row[1])
        for i, run in enumerate(runs):
            metrics = Run.open(run).metrics()
            values = [m[key] for m in metrics]
            assert by_epoch[i] == ([1, 2], values, "-")
            assert by_time[i][0] == pytest.approx(wall_minutes(metrics)) and by_time[i][1] == values
    minutes = wall_minutes(Run.open(runs[0]).metrics())
    assert minutes == sorted(minutes) and minutes[0] > 0


def test_a_validation_split_is_drawn_dashed_where_the_metrics_have_it(runs, tmp_path):
    copy = tmp_path / "with-val"
    shutil.copytree(runs[0], copy)
    metrics = Run.open(copy).metrics()
    for m in metrics[1:]:                       # an epoch without it, as a run resumed under a newer vaekit
        m["val_elbo"] = m["test_elbo"] + 1
    (copy / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    elbo_by_epoch = curves_figure([copy]).axes[0]
    assert lines_of(elbo_by_epoch)[1] == ([2], [m["val_elbo"] for m in metrics[1:]], "--")
    assert [t.get_text() for t in elbo_by_epoch.get_legend().get_texts()] == [f"{copy} (test)", f"{copy} (val)"]


def test_vaekit_plot_writes_a_png_beside_one_run_or_in_the_working_directory(runs, tmp_path, monkeypatch):
    one = plot_runs(runs[:1])
    assert one == runs[0] / "curves.png" and Image.open(one).size == (1200, 960)
    monkeypatch.chdir(tmp_path)
    both = vaekit("plot", *runs).stdout.strip()
    assert both == "curves.png" and Image.open(tmp_path / "curves.png").size == (1200, 960)
    assert "<svg" in plot_runs(runs, "curves.svg").read_text()         # the format its name says
    refused = vaekit("plot", *runs, "--out", "curves.xyz", check=False)
    assert refused.returncode == 2 and refused.stderr.startswith("vaekit: error: --out curves.xyz: matplotlib cannot")
    assert not (tmp_path / "curves.xyz").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "curves.png", "curves.svg"]                                     # no temporary file left beside them


def test_plot_refuses_in_one_line_a_run_without_metrics_and_a_missing_extra(runs, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    shutil.copytree(runs[0], empty)
    (empty / "metrics.jsonl").unlink()
    assert main(["plot", str(runs[0]), str(empty)]) == 2
    assert capsys.readouterr().err == (f"vaekit: error: {empty} has no metrics.jsonl lines yet: train it for an "
                                       "epoch first\n")
    image = runs[0] / "images" / "image_at_epoch_0001.png"      # a run's own picture is never written over
    before = image.read_bytes()
    assert main(["plot", str(runs[0]), "--out", str(image)]) == 2
    assert capsys.readouterr().err.startswith(f"vaekit: error: --out {image}, inside {runs[0] / 'images'}, is part "
                                              f"of the run {runs[0]}, which no command writes over")
    assert image.read_bytes() == before
    monkeypatch.setitem(sys.modules, "matplotlib", None)        # as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install 'vaekit\[plot\]'"):
        plot_runs(runs)


# -- TensorBoard ---------------------------------------------------------------------------------
def read_events(folder):
    """What TensorBoard itself reads from the event files: {tag: [(step, value)]} and the images."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = {tag: [(s.step, s.value) for s in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return scalars, events.Images("fixed_z_grid")


def test_tensorboard_gets_each_epochs_metrics_and_grid_and_a_resume_goes_on(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed: pip install -e '.[test]'")
    config = sample_config(epochs=2, batch_size=250, lr=1e-3)
    config.train.tensorboard = True
    run = train(config, out=tmp_path / "run", log=quiet)
    train(resume=run.path, epochs=3, log=quiet)
    scalars, images = read_events(run.path / "tensorboard")
    metrics = run.metrics()
    for key in ("test_elbo", "test_rate", "test_distortion", "train_loss", "epoch_seconds"):
        assert scalars[key] == [(m["epoch"], pytest.approx(m[key])) for m in metrics], key
    assert "epoch" not in scalars and "step" not in scalars
    assert [image.step for image in images] == [0, 1, 2, 3]
    last = Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("L")
    assert np.array_equal(np.asarray(last), np.asarray(Image.open(run.image_path(3))))


def test_tensorboard_without_its_package_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    config = sample_config(epochs=1)
    config.train.tensorboard = True
    with pytest.raises(ConfigError, match=r"^--tensorboard needs TensorBoard's package: pip install "
                                          r"'vaekit\[tensorboard\]'$"):
        train(config, out=tmp_path / "run", log=quiet)
    assert not (tmp_path / "run").exists()
