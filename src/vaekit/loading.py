"""Opening a run for inference: the one way the API, the demo and export get a model from a
run directory (RUN, RUN@best) or a shipped model (pretrained:NAME; the syntax is runs.py's)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import load_weights_into
from .compiling import for_inference
from .config import Config
from .data import Splits, check_data_fits, fingerprint, splits_for
from .distributed import Runtime, setup
from .errors import ConfigError, RunError
from .files import load_tensors, sha256
from .models import build_model
from .models.code_prior import CodePrior, PriorConfig
from .models.inference import prepare_for_inference
from .runs import Run


@dataclass
class OpenRun:
    """A run opened for inference (see open_for_inference): its model on the runtime's device in
    eval mode, its config, the weights file it was loaded from, and the run, which says where
    commands write (`run.out`)."""
    run: Run
    model: torch.nn.Module
    config: Config
    runtime: Runtime
    weights: Path
    data_fingerprint: dict | None = None   # of the data `data()` read last: what an evaluation scored

    def data(self, data_dir: str | Path | None = None) -> Splits:
        """The run's dataset in memory, read from `data_dir` (default: where it was trained), checked
        to hold images of the size and channels the model takes and to be the data the run was
        trained on (its data.json, as a resume checks it): DataError otherwise, so that no command
        scores other data under the run's name. Its fingerprint is kept (data_fingerprint), so that
        an evaluation's entry in eval.json says which data it scored."""
        data = self.config.data
        where = str(data_dir or data.data_dir or data.dataset)
        splits = splits_for(data, data_dir)
        check_data_fits(self.config.model, splits, where)
        self.data_fingerprint = fingerprint(splits)
        self.run.check_data(self.data_fingerprint, where)
        return splits


def open_for_inference(run: str | Path, device: str = "auto", precision: str = "auto", fall_back: bool = False,
                       prepared: bool = True, unconditional_task: str | None = None,
                       continuous_task: str | None = None, compile: str | None = None) -> OpenRun:
    """The run RUN (its newest weights; with `fall_back`, the newest intact ones when newer ones
    are damaged), RUN@best (its best validation epoch's weights), RUN@epoch_N (a kept epoch
    checkpoint's) or pretrained:NAME, ready for
    inference on `device` in `precision` (auto: bf16 where the hardware runs it natively, as in
    training; see models/inference.py). With `prepared=False`, the model as training builds it
    (plain parameters, e.g. to export it). A vq model runs as trained, in fp32, whatever
    `precision` says: its codes are nearest neighbours, which bf16 would move. `unconditional_task`:
    the command asking, when it is one for unconditional models only (a class-conditional run is
    refused); `continuous_task`:
    the command asking, when it works on a continuous z (a vq run, whose codes are discrete, is
    refused). `compile`: auto, on or off (compiling.py), instead of the run's own --compile setting."""
    opened = Run.open(run)
    config = opened.config()
    if compile is not None:
        config.train.compile = compile
    if unconditional_task and config.model.conditional:
        raise ConfigError(f"`vaekit {unconditional_task}` is for unconditional models and {run} is "
                          "class-conditional: use `vaekit sample --label` or `vaekit reconstruct`")
    if continuous_task and config.model.family == "vq":
        raise ConfigError(f"`vaekit {continuous_task}` works on a continuous z, and {run} is a vq model, whose codes "
                          "are discrete: use `vaekit sample`, `reconstruct`, `interpolate` or `inpaint`")
    runtime = setup(device, "fp32" if config.model.family == "vq" else precision)
    weights = opened.checkpoints.weights_file(best=opened.best, fall_back=fall_back, epoch=opened.epoch)
    model = model_for_inference(config.model, load_tensors(weights), opened.path, runtime, config.train.compile,
                                prepared)
    return OpenRun(opened, model, config, runtime, weights)


def model_for_inference(model_config, weights: dict[str, torch.Tensor], source, runtime: Runtime,
                        compile_setting: str, prepared: bool = True) -> torch.nn.Module:
    """The model of `model_config` with `weights` (read from `source`, which a RunError names when
    they do not fit) on `runtime`'s device in eval mode: prepared for inference and compiled as
    `compile_setting` says, or (`prepared=False`, or a vq model, which runs as trained in fp32: its
    codes' distances) as training builds it."""
    model = build_model(model_config)
    load_weights_into(model, weights, source)
    if prepared and model_config.family != "vq":
        return for_inference(prepare_for_inference(model, runtime), compile_setting, runtime.device)
    return model.to(runtime.device, memory_format=torch.channels_last).eval()


def load_model(path: str | Path, device: str = "auto", precision: str = "auto", fall_back: bool = False,
               prepared: bool = True):
    """(model, config, runtime) of open_for_inference(path, device, precision, fall_back, prepared)."""
    opened = open_for_inference(path, device, precision, fall_back, prepared)
    return opened.model, opened.config, opened.runtime


def check_prior_fits(run: Run, weights: Path) -> None:
    """RunError unless the prior in RUN/prior/ (if any) was fitted to the first stage's `weights`."""
    record = run.stage_record()
    if record is not None and record["first_stage_sha256"] != sha256(weights):
        raise RunError(f"the prior in {run.prior_stage.path} was fitted to other first-stage weights than {weights} "
                       f"(the first stage trained on since, or @best or @epoch_N was asked): move {run.prior_stage.path} "
                       f"away and train it again: vaekit train-prior {run.path}")


def load_prior(opened: OpenRun, required_by: str | None = None) -> CodePrior | None:
    """The code prior of the vq run `opened` (RUN/prior/'s newest weights) on its device in eval
    mode, or None when it has none; with `required_by` (a command's name), a one-line RunError
    instead of None."""
    stage = opened.run.prior_stage
    if opened.run.stage_record() is None:
        if required_by is None:
            return None
        raise RunError(f"`vaekit {required_by}` draws codes from the prior of {opened.run.name.text}, which has none "
                       f"yet: train its prior first: vaekit train-prior {opened.run.path}")
    check_prior_fits(opened.run, opened.weights)
    prior = CodePrior(PriorConfig.for_model(opened.model))
    weights = stage.checkpoints.weights_file()
    load_weights_into(prior, load_tensors(weights), weights)
    return prior.to(opened.runtime.device).eval()
