"""`vaekit export --format onnx`: a run's encoder and decoder as two ONNX files with a dynamic batch.

encoder.onnx: x float32 [N,C,H,W] (preprocessed as in training: binary for the seed's model)
              -> mean, logvar float32 [N,latent], the parameters of q(z|x)
decoder.onnx: z float32 [N,latent] -> params float32 [N,C*P,H,W], the likelihood's parameters
              (Bernoulli: logits), and image float32 [N,C,H,W] in [0,1], the image they mean
A class-conditional model takes `label` int64 [N] as a second input of each.
A vq model (discrete codes on an h x w grid, h = H/4):
encoder.onnx: x float32 [N,C,H,W] -> codes int64 [N,h,w], the nearest codebook vector of each position
decoder.onnx: codes int64 [N,h,w] -> params and image as above
              (the code prior's sampling loop is not exported: draw codes in Python, or decode any grid)
manifest.json: the SHA-256 of both files and the weights they were made from (the run, the
              checkpoint file and its SHA-256), so a pair can be traced and checked.

The folder is written as one unit (files.replacing_folder): built beside its place under a
temporary name, checked, then renamed into place, so a kill leaves the old pair or the new one,
never an encoder from one checkpoint beside a decoder from another.

torch's exporter needs onnx and onnxscript, and onnxruntime checks the files against torch: all
three come with the optional extra `pip install 'vaekit[export]'`; only this module imports them.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError
from .files import replacing_folder, sha256
from .loading import open_for_inference
from .runs import Run, check_not_kept
from .models.layers import ConvTranspose2d

FILES = ("encoder.onnx", "decoder.onnx", "manifest.json")
MANIFEST = FILES[2]      # a folder holding it is an earlier export, which a new one may replace

FORMATS = ("onnx",)
EXPORT_FOLDER = "onnx"    # where `vaekit export RUN` writes by default: RUN/onnx
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class _Encoder(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None):
        return self.vae.encode(x, label)


class _Decoder(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None):
        params = self.vae.decode(z, label)
        return params, self.vae.likelihood.mean(params)


class _VQEncoder(nn.Module):
    def __init__(self, vq: nn.Module) -> None:
        super().__init__()
        self.vq = vq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vq.quantize(self.vq.encode(x)).indices


class _VQDecoder(nn.Module):
    def __init__(self, vq: nn.Module) -> None:
        super().__init__()
        self.vq = vq

    def forward(self, codes: torch.Tensor):
        params = self.vq.decode_indices(codes)
        return params, self.vq.likelihood.mean(params)


def _portable(model: nn.Module) -> nn.Module:
    """A copy of `model` (on the CPU, fp32, contiguous) whose transposed convolutions are plain
    nn.ConvTranspose2d (+ ReLU) with the same weights: vaekit's own layer calls a oneDNN kernel
    with a fused ReLU (models/layers.py), which has no ONNX equivalent."""
    model = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format).eval()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, ConvTranspose2d):
                plain = nn.ConvTranspose2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                           child.padding, child.output_padding)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, nn.Sequential(plain, nn.ReLU()) if child.relu else plain)
    return model


@contextlib.contextmanager
def _quiet_exporter():
    """Keeps torch's exporter from printing its own deprecation notices and its warnings about
    torchvision operators (vaekit uses none)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", "# The axis name")    # a label's batch axis is the image's
            yield
    finally:
        logger.setLevel(level)


def _inputs(model: nn.Module, first: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """Example inputs: `first` [n,...], plus labels [n] for a conditional model."""
    if not model.config.conditional:
        return (first,)
    return first, torch.arange(n) % model.config.num_classes


def _check_out_dir(out_dir: Path) -> None:
    """ConfigError unless `out_dir` is new, empty or an earlier export, its manifest.json there (it
    is replaced whole), and is none of the folders a run keeps (runs.check_not_kept)."""
    check_not_kept(out_dir, instead=lambda run: Run(run).out / EXPORT_FOLDER)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file; choose a folder for --out")
    held = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    others = [name for name in held if name not in FILES]
    if others:
        raise ConfigError(f"{out_dir} holds other files than an export ({others[0]}, ...), and an export replaces "
                          "its folder whole; choose a new folder for --out")
    if held and MANIFEST not in held:
        raise ConfigError(f"{out_dir} holds {held[0]} but no {MANIFEST}, so it is not an earlier export, and an export "
                          "replaces its folder whole; choose a new folder for --out (or move the file away)")


def export_onnx(model: nn.Module, out_dir: str | Path, check_batch: int = 5, source: dict | None = None) -> dict:
    """Writes OUT_DIR/encoder.onnx, OUT_DIR/decoder.onnx and OUT_DIR/manifest.json (their SHA-256
    and `source`, what the weights came from) for a vaekit model as one unit, after running both
    with onnxruntime on `check_batch` random inputs (a batch size other than the export's, so the
    dynamic batch is exercised) and comparing them with torch. Returns {"files": [the two ONNX
    paths], "manifest": its path, "max_abs_diff": largest |onnxruntime - torch| over every float
    output, and for a vq model "codes_differing": the encoder's codes (of check_batch x h x w) that
    differ from torch's, a near tie between codebook vectors rounding the other way}."""
    missing = [name for name in EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"ONNX export needs {', '.join(missing)}: pip install 'vaekit[export]'")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with replacing_folder(out_dir) as tmp:
        worst, differing = _write_pair(_portable(model), tmp, check_batch)
        sums = {name: sha256(tmp / name) for name in FILES[:2]}
        codes = {"codes_differing": differing} if model.config.family == "vq" else {}
        manifest = {"files": sums, "source": source, "max_abs_diff": worst, **codes}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return {"files": [out_dir / name for name in FILES[:2]], "manifest": out_dir / MANIFEST,
            "max_abs_diff": worst, **codes}


def _write_pair(model: nn.Module, out_dir: Path, check_batch: int) -> tuple[float, int]:
    """Writes encoder.onnx and decoder.onnx of a _portable model into `out_dir` and checks them with
    onnxruntime (see export_onnx); returns the largest difference of a float output from torch and
    the number of integer outputs (a vq encoder's codes) that differ from torch's."""
    import onnxruntime

    c, size = model.config.image_channels, model.config.image_size
    gen = torch.Generator().manual_seed(0)
    parts = _vq_parts(model, gen) if model.config.family == "vq" else [(_Encoder(model), "encoder", ["x"], ["mean", "logvar"],
              lambda n: torch.rand(n, c, size, size, generator=gen).round()),
             (_Decoder(model), "decoder", ["z"], ["params", "image"],
              lambda n: torch.randn(n, model.latent_dim, generator=gen))]
    worst, differing = 0.0, 0
    for module, name, names, outputs, draw in parts:
        path = out_dir / f"{name}.onnx"
        example = _inputs(model, draw(2), 2)
        names = names + ["label"] * model.config.conditional
        batch = torch.export.Dim("batch")
        with _quiet_exporter():
            torch.onnx.export(module.eval(), example, str(path), input_names=names, output_names=outputs,
                              dynamo=True, dynamic_shapes=tuple({0: batch} for _ in example), external_data=False,
                              verbose=False)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        check = _inputs(model, draw(check_batch), check_batch)
        got = session.run(None, {n: t.numpy() for n, t in zip(names, check)})
        with torch.inference_mode():
            want = module(*check)
        want = want if isinstance(want, tuple) else (want,)     # a vq encoder has one output
        for g, w in zip(got, want):
            g = torch.from_numpy(g)
            if w.is_floating_point():
                worst = max(worst, (g - w).abs().max().item())
            else:     # a vq encoder's codes: a near tie between two codebook vectors may round either way
                differing += int((g != w).sum())
    return worst, differing


def _vq_parts(model: nn.Module, gen: torch.Generator) -> list:
    """_write_pair's (module, name, inputs, outputs, example draw) of a vq model's two files."""
    c, size, side, k = (model.config.image_channels, model.config.image_size, model.config.grid_size,
                        model.config.codebook_size)
    return [(_VQEncoder(model), "encoder", ["x"], ["codes"], lambda n: torch.rand(n, c, size, size, generator=gen).round()),
            (_VQDecoder(model), "decoder", ["codes"], ["params", "image"],
             lambda n: torch.randint(k, (n, side, side), generator=gen))]


def export_run(run: str | Path, format: str = "onnx", out: str | Path | None = None) -> dict:
    """`vaekit export`: the newest weights of `run` (or RUN@best's, or a shipped model's) as
    encoder.onnx and decoder.onnx in `out` (default RUN/onnx/), with manifest.json naming the
    checkpoint file they came from; see export_onnx for the files and the check."""
    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}; got {format!r}")
    opened = open_for_inference(run, "cpu", "fp32", prepared=False)
    source = {"run": str(run), "weights": str(opened.weights), "weights_sha256": sha256(opened.weights)}
    return export_onnx(opened.model, out or opened.run.out / EXPORT_FOLDER, source=source)
