"""`vaekit export --format onnx`: the files onnxruntime runs give the torch model's outputs, at
batch sizes other than the export's; a conditional model takes its labels; the pair is written as
one unit, with a manifest naming the checkpoint, even when the export is killed; one-line refusals."""
import hashlib
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import cli_env, sample_config
from test_cli import vaekit
from vaekit import ConfigError, export_run, load_model, train
from vaekit.cli import main
from vaekit.export import export_onnx
from vaekit.models import ModelConfig, build_model

ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e '.[test]'")


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = sample_config(epochs=1, batch_size=100, lr=1e-3)
    return train(config, out=tmp_path_factory.mktemp("export") / "run", log=quiet).path


@pytest.fixture(scope="module")
def exported(run):
    """What `vaekit export RUN` prints: the two files, then the check's line."""
    return vaekit("export", run).stdout.splitlines()


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 7])
def test_onnxruntime_gives_the_torch_models_outputs_at_any_batch_size(run, exported, batch):
    model, _, _ = load_model(run, "cpu", "fp32")   # vaekit's own model, prepared for inference (oneDNN layers)
    x = (torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch)) > 0.5).float()
    z = torch.randn(batch, 50, generator=torch.Generator().manual_seed(batch))
    encoder, decoder = session(run / "onnx" / "encoder.onnx"), session(run / "onnx" / "decoder.onnx")
    assert [i.name for i in encoder.get_inputs()] == ["x"] and [o.name for o in encoder.get_outputs()] == \
        ["mean", "logvar"]
    assert [o.name for o in decoder.get_outputs()] == ["params", "image"]
    mean, logvar = encoder.run(None, {"x": x.numpy()})
    params, image = decoder.run(None, {"z": z.numpy()})
    with torch.inference_mode():
        want_mean, want_logvar = model.encode(x)
        want_params, want_image = model.decode(z), model.decode(z, as_image=True)
    for got, want in ((mean, want_mean), (logvar, want_logvar), (params, want_params), (image, want_image)):
        assert got.shape == tuple(want.shape)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)


def test_a_conditional_model_takes_its_labels(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(conditional=True, num_classes=10, latent_dim=8)).eval()
    export_onnx(model, tmp_path)
    z, labels = torch.randn(4, 8), torch.tensor([0, 3, 3, 9])
    decoder = session(tmp_path / "decoder.onnx")
    assert [i.name for i in decoder.get_inputs()] == ["z", "label"]
    params, _ = decoder.run(None, {"z": z.numpy(), "label": labels.numpy()})
    with torch.inference_mode():
        np.testing.assert_allclose(params, model.decode(z, labels).numpy(), atol=1e-4, rtol=1e-4)
        other = model.decode(z, torch.tensor([1, 1, 1, 1])).numpy()
    assert not np.allclose(params, other, atol=1e-3)      # the label matters


@pytest.mark.parametrize("family", ["ladder", "spatial"])
def test_a_hierarchical_models_top_code_round_trips_through_onnx(tmp_path, family):
    """The encoder gives the top layer's posterior; the decoder takes a top code through the
    whole top-down path (the layers below at their prior means)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(family=family, latent_dim=6, hidden_channels=16, res_blocks=1)).eval()
    for p in model.parameters():      # away from the zero-initialised heads and blocks: every layer matters
        p.data.add_(torch.randn_like(p), alpha=0.02)
    export_onnx(model, tmp_path)
    x, z = (torch.rand(3, 1, 28, 28) > 0.5).float(), torch.randn(3, 6)
    mean, _ = session(tmp_path / "encoder.onnx").run(None, {"x": x.numpy()})
    params, _ = session(tmp_path / "decoder.onnx").run(None, {"z": z.numpy()})
    with torch.inference_mode():
        np.testing.assert_allclose(mean, model.encode(x)[0].numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(params, model.decode(z).numpy(), atol=1e-4, rtol=1e-4)


def test_vaekit_export_writes_both_files_into_the_run_by_default(run, exported):
    lines = exported
    assert lines[:2] == [str(run / "onnx" / "encoder.onnx"), str(run / "onnx" / "decoder.onnx")]
    assert lines[2].startswith("checked with onnxruntime against torch: largest difference ")
    assert float(lines[2].rsplit(" ", 1)[1]) < 1e-4
    weights = run / "checkpoints" / "epoch_0001" / "model.safetensors"
    assert consistent_pair(run / "onnx") == {"run": str(run), "weights": str(weights), "weights_sha256": sha256(weights)}


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def consistent_pair(folder):
    """The manifest's source, once both files are checked against the SHA-256 it records of them."""
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == ["decoder.onnx", "encoder.onnx", "manifest.json"]
    assert {name: sha256(folder / name) for name in ("encoder.onnx", "decoder.onnx")} == manifest["files"]
    return manifest["source"]


def test_a_kill_9_while_exporting_never_leaves_a_mixed_pair(run, tmp_path):
    other = train(sample_config(epochs=1, batch_size=100, lr=1e-3, seed=1), out=tmp_path / "other", log=quiet).path
    out = tmp_path / "onnx"
    began = time.monotonic()
    vaekit("export", run, "--out", out)
    took = time.monotonic() - began
    sources = {str(run), str(other)}
    for fraction in (0.7, 0.95):           # killed at points in the writing of the pair
        proc = subprocess.Popen([sys.executable, "-m", "vaekit", "export", str(other), "--out", str(out)],
                                env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(took * fraction)
        proc.kill()
        proc.wait()
        if out.exists():                # absent only in the instant between moving the old pair aside and the new in
            assert consistent_pair(out)["run"] in sources
    vaekit("export", other, "--out", out)
    assert consistent_pair(out)["run"] == str(other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx", "other"]   # nothing left of the killed exports


def test_an_export_replaces_only_an_export(run, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["export", str(run), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"vaekit: error: {tmp_path} holds other files than an export (notes.txt, ...), "
                                       "and an export replaces its folder whole; choose a new folder for --out\n")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    mine = tmp_path / "mine"                  # a file of an export's name, but no manifest.json: not an export
    mine.mkdir()
    (mine / "encoder.onnx").write_text("my own encoder")
    assert main(["export", str(run), "--out", str(mine)]) == 2
    assert capsys.readouterr().err == (f"vaekit: error: {mine} holds encoder.onnx but no manifest.json, so it is not "
                                       "an earlier export, and an export replaces its folder whole; choose a new "
                                       "folder for --out (or move the file away)\n")
    assert [p.name for p in mine.iterdir()] == ["encoder.onnx"]
    assert (mine / "encoder.onnx").read_text() == "my own encoder"


def test_bad_input_and_a_missing_extra_are_one_line(run, capsys, monkeypatch):
    assert main(["export", str(run), "--format", "tflite"]) == 2
    assert capsys.readouterr().err == "vaekit: error: --format must be one of onnx; got 'tflite'\n"
    monkeypatch.setitem(sys.modules, "onnxscript", None)       # as if it were not installed
    assert main(["export", str(run)]) == 2
    assert capsys.readouterr().err == "vaekit: error: ONNX export needs onnxscript: pip install 'vaekit[export]'\n"
    with pytest.raises(ConfigError):
        export_run(run)
