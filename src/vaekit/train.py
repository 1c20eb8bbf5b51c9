"""The training loop: short, explicit, resumable; the same code on one process or N torchrun ranks.

Where training stands is a Progress (epochs done, batches of the next epoch done, steps). A
checkpoint holds it with the epoch-order generator's state at the start of that epoch, so a
resume draws the same permutation, skips the batches done and goes on with the same noise:
its weights equal an uninterrupted run's, bit for bit.

Across ranks the configured batch is the global batch. Every rank draws the same permutation
and the same noise for the whole global batch, then trains on its own rows of it, so the result
does not depend on the number of ranks (up to float rounding in the gradient all-reduce).
"""
from __future__ import annotations

import importlib.util
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .checkpoints import Checkpoint, Progress
from .config import Config
from .data import ImageData, Splits, check_data_fits, fingerprint, hold_out, preprocess, splits_for
from .data.sources import to_stderr
from .distributed import Runtime, restarted, setup
from .evaluate import elbo_report, epoch_test_record
from .models import ModelConfig, build_model
from .objectives import training_loss
from .errors import ConfigError, DataError, RunError
from .runs import BEST_SUFFIX, Run
from .schedule import EarlyStop, Schedule
from .viz import gif_from_pngs, save_grid

NUM_EXAMPLES_TO_GENERATE = 16   # the seed's 4x4 progress grid
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PROGRESS_SECONDS = 60           # without a progress bar (stderr not a terminal): a plain line this often


def say(message: str) -> None:
    """train's default log: stdout, flushed, so `vaekit train > log` or `| tee log` shows each line
    when it is written rather than when the run ends."""
    print(message, flush=True)


class Interrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after writing a checkpoint; `signum` says which."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


def train(config: Config | None = None, out: str | Path | None = None, resume: str | Path | None = None,
          epochs: int | None = None, log=say, data_dir: str | Path | None = None, fall_back: bool = False) -> Run:
    """Trains a new run in `out` with `config`, or goes on with the run in `resume` from its
    newest checkpoint (`epochs` may extend it; `data_dir` names where its data is now, which must
    be the data it was trained on; `fall_back`: from the newest intact checkpoint when newer
    ones are damaged, moving those to checkpoints/set-aside/). Returns the run. The run
    directory of a new run is made once its data and model are known good, and removed again
    when training fails before its first checkpoint.

    Under torchrun every rank calls this; rank 0 alone writes the run directory. When torchrun
    restarts the ranks after a failure (--max-restarts), `out` holding a run of this very config
    is resumed rather than refused. Raises RunError, ConfigError or DataError with a one-line
    message, and Interrupted after a stop signal (a checkpoint is written first)."""
    if (resume is None) == (out is None):
        raise ValueError("train() needs exactly one of out= (a new run) or resume= (an existing run)")
    config = config or Config()
    if out is not None and restarted() and Run(out).config_path.is_file() and _same_config(Run(out).config(), config):
        resume, out = out, None
    if resume is not None:
        if str(resume).endswith(BEST_SUFFIX):
            raise ConfigError(f"--resume goes on from a run's newest checkpoint: pass {str(resume)[:-len(BEST_SUFFIX)]} "
                              f"without {BEST_SUFFIX}")
        run = Run.open(resume)
        config = run.config()
        if epochs is not None:
            config.train.epochs = epochs
        if data_dir is not None:
            config.data = replace(config.data, data_dir=str(data_dir))
    else:
        run = Run(out)
    if config.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs TensorBoard's package: pip install 'vaekit[tensorboard]'")
    rt = setup(config.train.device, config.train.precision, distributed=True)
    finished = False
    try:
        if rt.is_main:
            if resume is None:
                run.check_new()    # at once, before the data is read; the folder is made later
            else:
                run.lock()
        _train(run, config, rt, resuming=resume is not None, fall_back=fall_back,
               log=log if rt.is_main else _silent)
        rt.barrier()   # no rank leaves the process group while rank 0 still writes: gloo may abort the leaver
        finished = True
    except Interrupted as e:
        # its traceback holds _train's frames, and so DDP's reducer: without them, rt.close()
        # collects the reducer while the interpreter lives (else a rank can abort at exit, 134)
        raise e.with_traceback(None)
    except OSError as e:   # a full disk or a run directory made read-only while training
        raise RunError(f"cannot write {e.filename or run.path}: {e.strerror}; free disk space or fix permissions, "
                       f"then `vaekit train --resume {run.path}` (its last checkpoint is intact)") from None
    finally:
        run.unlock()
        if not finished:
            run.remove_unstarted()    # a new run that failed before its first checkpoint: a retry may reuse --out
        rt.close()
    return run


def _restore(run: Run, model, optimizer, generators: dict[str, torch.Generator], epochs: int,
             fall_back: bool) -> tuple[Progress, list[float], Path | None, list[Path]]:
    """Restores the model, the optimizer and the generators from the run's newest checkpoint (with
    `fall_back`, the newest intact one). Returns (where training stands, the losses of the epoch's
    steps so far, the checkpoint restored, the damaged ones to set aside); (start, [], None,
    damaged) when there is none."""
    latest, damaged = run.checkpoints.find(fall_back)
    if latest is None:
        return Progress(), [], None, damaged
    ckpt = run.checkpoints.load(latest)
    ckpt.restore(model, optimizer, generators, latest)
    if epochs < ckpt.progress.epoch:
        raise ConfigError(f"--epochs {epochs} is fewer than the {ckpt.progress.epoch} epochs {run.path} has done")
    return ckpt.progress, ckpt.step_losses, latest, damaged


def _held_out_record(model, config: Config, rt: Runtime, epoch: int, test_images: torch.Tensor,
                     test_labels: torch.Tensor | None, val_split) -> dict:
    """The end of an epoch's numbers on the data it did not train on: epoch_test_record's test
    numbers, and with a validation split its val_elbo, val_distortion and val_rate. The test set
    is binarised afresh each epoch from a seed of the epoch, whose generator then draws z."""
    seed = config.train.seed * 1_000_003 + epoch
    gen = rt.generator(seed)
    x = preprocess(test_images, config.data.binarization, gen)
    record = epoch_test_record(model, x, gen, test_labels, config, rt, seed)
    if len(val_split):
        gen = rt.generator(seed + 1)
        x = preprocess(val_split.images.to(rt.device), config.data.binarization, gen)
        val_labels = val_split.labels.to(rt.device) if config.model.conditional else None
        val = elbo_report(model, x, config.data.binarization, rt, gen, config.train.eval_batch_size, val_labels)
        record.update({f"val_{key}": val[key] for key in ("elbo", "distortion", "rate")})
    return record


def _same_config(saved: Config, config: Config) -> bool:
    """Whether a run's config.json holds `config`, counting the classes a conditional run's file
    learned from the data as given."""
    if config.model.conditional and not config.model.num_classes:
        config = replace(config, model=replace(config.model, num_classes=saved.model.num_classes))
    return saved == config


def _silent(*_) -> None:
    """The log of ranks other than 0: one process speaks for the job."""


@dataclass
class _TrainingData:
    """What training reads, on the device: the images it trains on and the test images (with their
    labels for a class-conditional model, else None), and the validation split held out of the
    training set (ImageData, on the CPU)."""
    train_images: torch.Tensor
    train_labels: torch.Tensor | None
    test_images: torch.Tensor
    test_labels: torch.Tensor | None
    val_split: ImageData


def _training_data(splits: Splits, config: Config, rt: Runtime) -> _TrainingData:
    """The splits as training reads them; RunError or ConfigError when the batch does not fit them."""
    train_split, val_split = hold_out(splits.train, config.data.validation)
    conditional, batch_size = config.model.conditional, config.train.batch_size
    data = _TrainingData(train_split.images.to(rt.device), train_split.labels.to(rt.device) if conditional else None,
                         splits.test.images.to(rt.device), splits.test.labels.to(rt.device) if conditional else None,
                         val_split)
    if batch_size > len(data.train_images):
        raise RunError(f"batch_size {batch_size} is larger than the {len(data.train_images)} training images; "
                       "lower --batch-size")
    if batch_size < rt.world_size:
        raise ConfigError(f"batch_size {batch_size} (the global batch) is smaller than the {rt.world_size} "
                          "processes; raise --batch-size")
    return data


def _check_same_data(run: Run, config: Config, data: dict) -> None:
    """DataError when a resumed run's data is not what it was trained on (`data`: its fingerprint now)."""
    recorded = run.data_fingerprint()
    if recorded is not None and recorded != data:
        raise DataError(f"{config.data.data_dir or config.data.dataset} does not hold the data {run.path} was "
                        f"trained on ({data['train']}/{data['test']} train/test images of SHA-256 "
                        f"{data['sha256'][:12]}, not {recorded['train']}/{recorded['test']} of "
                        f"{recorded['sha256'][:12]}); pass --data-dir the folder it was trained on")


def _train(run: Run, config: Config, rt: Runtime, resuming: bool, fall_back: bool, log) -> None:
    """This rank's share of `train`: the data and the model (restored from the run's checkpoint
    when `resuming`), the run directory (rank 0), then the epochs still to train (see _Epochs)."""
    tc = config.train
    with rt.local_main_first():    # one download per machine; the other ranks then read the cache
        splits = splits_for(config.data, log=to_stderr if rt.is_main else _silent)   # warnings: stderr
    if config.model.conditional and not config.model.num_classes:
        config.model.num_classes = splits.num_classes     # saved in config.json below
    check_data_fits(config.model, splits, config.data.data_dir or config.data.dataset)
    torch.manual_seed(tc.seed)
    # channels_last: the layout oneDNN's and cuDNN's fast convolution kernels want (CPU: +30%)
    model = build_model(config.model).to(rt.device, memory_format=torch.channels_last)
    # fused: one kernel for all parameters instead of ~10 per tensor (CPU: 0.7 -> 0.3 ms a step)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, eps=tc.adam_eps, fused=True)
    order_gen = torch.Generator().manual_seed(tc.seed)          # epoch permutations (CPU)
    noise_gen = rt.generator(tc.seed + 1)                       # reparameterization, dynamic binarization

    generators = {"torch": torch.default_generator, "order": order_gen, "noise": noise_gen}
    at, step_losses, latest, damaged = (_restore(run, model, optimizer, generators, tc.epochs, fall_back) if resuming
                                        else (Progress(), [], None, []))
    if latest is not None:
        if tc.epochs == at.epoch:
            log(f"Nothing to do: {run.path} has done its {at.epoch} epochs; `vaekit train --resume {run.path} "
                "--epochs N` trains on to epoch N")
            return
        log(f"Resuming {run.path} from {latest.name} (step {at.step}: epoch {at.epoch + 1}, batch {at.batch})")
    data = _training_data(splits, config, rt)
    dataset = fingerprint(splits)
    if resuming:
        _check_same_data(run, config, dataset)
    fixed_z = None
    if rt.is_main:
        if not resuming:
            run.make(config, dataset)   # the data and the model are known good: now the run directory
            run.lock()
        for path in damaged:            # --fall-back: the damaged checkpoints go out of the way, kept
            to_stderr(f"warning: set {path.name} aside as {run.checkpoints.set_aside(path)} (damaged); "
                      f"going on from {latest.name}")
        run.truncate_metrics(at.epoch)
        if latest is None:
            fixed_z = torch.randn(NUM_EXAMPLES_TO_GENERATE, model.noise_dim,
                                  generator=torch.Generator().manual_seed(tc.seed + 2))
            run.save_fixed_z(fixed_z)
            save_grid(model.decode_prior(fixed_z.to(rt.device), y=grid_labels(config.model, rt.device)).detach(),
                      run.image_path(0))
        fixed_z = run.fixed_z().to(rt.device)
    board = _open_board(run, at.epoch) if rt.is_main and tc.tensorboard else None
    if board and latest is None:
        _log_board(board, 0, {}, run.image_path(0))
    processes = f"{rt.world_size} processes on {rt.device.type}" if rt.world_size > 1 else rt.device.type
    held_out = f"{len(data.val_split)} validation / " if len(data.val_split) else ""
    log(f"Training {run.path} on {processes} ({rt.precision}): {len(data.train_images)} train / {held_out}"
        f"{len(data.test_images)} test images, epochs {at.epoch + 1}..{tc.epochs}")
    loop = _Epochs(run, config, rt, log, model, optimizer, order_gen, noise_gen, data, at, step_losses, fixed_z, board,
                   # a resume's changed settings (--epochs, --data-dir) reach config.json with its first
                   # checkpoint: a resume that fails before it leaves config.json as it was
                   unsaved_config=resuming and config != run.config())
    if rt.max_all(int(rt.is_main and loop.stopping.due())):
        log(f"Nothing to do: {run.path} stopped early after epoch {loop.stopping.last_epoch} (best validation ELBO "
            f"{loop.stopping.best:.2f} at epoch {loop.stopping.best_epoch}); its weights: {run.path}{BEST_SUFFIX}")
        return
    with _StopSignals(rt) as stop:
        for epoch in range(at.epoch + 1, tc.epochs + 1):
            loop.train_epoch(epoch, stop)
            if rt.max_all(int(rt.is_main and loop.stopping.due())):    # rank 0 decides; every rank stops with it
                log(f"Early stop after epoch {epoch}: no better validation ELBO for {tc.early_stop} epochs (best "
                    f"{loop.stopping.best:.2f} at epoch {loop.stopping.best_epoch}; its weights: {run.path}{BEST_SUFFIX})")
                break
    if board:
        board.close()
    if rt.is_main:
        gif_from_pngs(sorted(run.images.glob("image_at_epoch_*.png")), run.gif_path)
        log(f"Done: {run.path} (grid images in {run.images}, animation {run.gif_path})")


class _Epochs:
    """The epochs of a training job on this rank, from where `at` stands: each one's steps with the
    checkpoints due in it (and a stop signal's), then on rank 0 its held-out numbers, progress
    grid, metrics line and checkpoint. `fixed_z` (the grid's codes) and `board` on rank 0 only."""

    def __init__(self, run: Run, config: Config, rt: Runtime, log, model, optimizer, order_gen: torch.Generator,
                 noise_gen: torch.Generator, data: _TrainingData, at: Progress, step_losses: list[float],
                 fixed_z: torch.Tensor | None, board, unsaved_config: bool) -> None:
        self.run, self.config, self.rt, self.log = run, config, rt, log
        self.model, self.trained, self.optimizer = model, rt.wrap(model), optimizer
        self.order_gen, self.noise_gen, self.data = order_gen, noise_gen, data
        self.at, self.step_losses, self.fixed_z, self.board = at, step_losses, fixed_z, board
        self.unsaved_config = unsaved_config
        self.schedule = Schedule(config.train, steps_per_epoch=-(-len(data.train_images) // config.train.batch_size))
        self.stopping = EarlyStop(config.train.early_stop, run.metrics() if rt.is_main else [])

    def checkpoint(self, order_state: torch.Tensor, losses: torch.Tensor) -> None:
        """Rank 0: a checkpoint where `at` stands (and config.json first, when a resume changed it)."""
        if self.unsaved_config:
            self.run.save_config(self.config)
            self.unsaved_config = False
        _save(self.run, self.at, self.model, self.optimizer, order_state, self.noise_gen, losses,
              self.config.train.keep_checkpoints)

    def train_epoch(self, epoch: int, stop: "_StopSignals") -> None:
        """Trains epoch `epoch` (from batch `at.batch` on); raises Interrupted after a stop signal,
        once rank 0 has checkpointed."""
        tc, rt, run = self.config.train, self.rt, self.run
        epoch_order = self.order_gen.get_state()    # what a mid-epoch checkpoint saves: a resume redraws this order
        batches = torch.randperm(len(self.data.train_images), generator=self.order_gen).to(rt.device).split(
            tc.batch_size)
        if self.at.batch > len(batches):
            raise RunError(f"the checkpoint is at batch {self.at.batch} of an epoch that now has {len(batches)}; "
                           "the training data changed since")
        losses = torch.zeros(len(batches), dtype=torch.float64, device=rt.device)  # each step's summed loss
        losses[:self.at.batch] = torch.tensor(self.step_losses, dtype=torch.float64)
        first_batch, start_time, skipped = self.at.batch, time.perf_counter(), [0]
        # counts batches, shown as images (and images/s) by scaling with the batch size
        with tqdm(total=len(batches), initial=self.at.batch, desc=f"epoch {epoch}/{tc.epochs}", unit="img",
                  unit_scale=tc.batch_size, leave=False, disable=None if rt.is_main else True,
                  dynamic_ncols=True) as bar:
            if bar.disable:    # stderr is no terminal (a log file, a pipe, a batch job): plain lines
                bar = _PlainProgress(self.log, f"epoch {epoch}/{tc.epochs}", len(batches), self.at.batch,
                                     tc.batch_size)
            while self.at.batch < len(batches):
                first = self.at.batch
                train_steps(self.trained, self.optimizer, self.data.train_images, self.data.train_labels, batches,
                            self.at, losses, self.config, rt, self.noise_gen, stop, bar, self.schedule, skipped)
                rt.sum_all(losses[first:self.at.batch])     # this rank's sums -> the global batches'
                _check_finite(losses, first, self.at, run)
                if rt.is_main and (stop.signum or self.at.batch < len(batches)):
                    self.checkpoint(epoch_order, losses)
                if stop.signum:
                    rt.barrier()   # a rank that exits makes torchrun stop the others: not before rank 0 saved
                    message = (f"Stopped by {signal.Signals(stop.signum).name} after step {self.at.step} "
                               f"(checkpoint {self.at.checkpoint_name}); go on with `vaekit train --resume {run.path}`")
                    self.log(message)
                    raise Interrupted(stop.signum, message)
        end_time = time.perf_counter()
        self.at, self.step_losses = Progress(epoch, 0, self.at.step), []
        if rt.is_main:
            trained_images = sum(len(idx) for idx in batches[first_batch:])
            self._end_epoch(epoch, losses, trained_images, end_time - start_time, skipped[0])

    def _end_epoch(self, epoch: int, losses: torch.Tensor, trained_images: int, seconds: float, skipped: int) -> None:
        """Rank 0, after epoch `epoch`'s steps (`trained_images` of them in `seconds` in this process;
        `losses` its steps' summed losses): its numbers, grid, metrics line and checkpoint."""
        config, rt, run = self.config, self.rt, self.run
        start = time.perf_counter()
        # the test set is small: rank 0 evaluates all of it, with the single-process noise
        test = _held_out_record(self.model, config, rt, epoch, self.data.test_images, self.data.test_labels,
                                self.data.val_split)
        eval_seconds = time.perf_counter() - start
        self.log("============================")
        self.log(f"Epoch: {epoch}, Test set ELBO: {test['test_elbo']:.2f}, time elapse for current epoch {seconds:.1f}")
        with torch.inference_mode():
            save_grid(self.model.decode_prior(self.fixed_z, y=grid_labels(config.model, rt.device)),
                      run.image_path(epoch))
        record = {
            "epoch": epoch, "step": self.at.step, "train_loss": losses.sum().item() / len(self.data.train_images),
            **test, "epoch_seconds": round(seconds, 3), "eval_seconds": round(eval_seconds, 3),
            "images_per_second": round(trained_images / seconds, 1), "lr": self.schedule.lr(self.at.step - 1),
            **({"skipped_updates": skipped} if config.train.skip_grad else {}),
        }
        run.append_metrics(record)
        if self.stopping.record(record):
            run.checkpoints.save_best(self.model.state_dict(), epoch, record["val_elbo"])
        if self.board:
            _log_board(self.board, epoch, record, run.image_path(epoch))
        self.checkpoint(self.order_gen.get_state(), losses)


def _open_board(run: Run, epochs_done: int):
    """TensorBoard's writer into RUN/tensorboard/ (--tensorboard). On a resume, TensorBoard hides
    what an earlier process logged for the epochs after `epochs_done` (purge_step), which are
    trained again."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run.path / "tensorboard"), purge_step=epochs_done + 1 if epochs_done else None)


def _log_board(board, epoch: int, record: dict, grid: Path) -> None:
    """An epoch's numbers (the metrics line's, under the same names) and its fixed-z grid image,
    written through to disk at once."""
    for key, value in record.items():
        if key not in ("epoch", "step"):
            board.add_scalar(key, value, epoch)
    with Image.open(grid) as image:
        board.add_image("fixed_z_grid", np.asarray(image.convert("RGB")), epoch, dataformats="HWC")
    board.flush()


def grid_labels(config: ModelConfig, device: torch.device) -> torch.Tensor | None:
    """The labels of the progress grid's images: classes in turn for a conditional model, else None."""
    if not config.conditional:
        return None
    return torch.arange(NUM_EXAMPLES_TO_GENERATE, device=device) % config.num_classes


def train_steps(model, optimizer, images: torch.Tensor, labels: torch.Tensor | None, batches: tuple[torch.Tensor, ...],
                at: Progress, losses: torch.Tensor, config: Config, rt: Runtime, noise_gen: torch.Generator,
                stop, bar, schedule: Schedule, skipped: list[int]) -> None:
    """Trains on the epoch's `batches` (global batches of indices into `images`, uint8 on the
    device, and `labels` for a conditional model) from batch `at.batch` on, advancing `at`, until
    the epoch ends, a checkpoint is due (every `checkpoint_every` steps) or every rank knows of a
    stop signal. losses[i] receives batch i's loss summed over this rank's rows.

    Each rank trains on its rows of every global batch, but binarization and reparameterization
    noise are drawn for the whole global batch on every rank: each example gets the same draws
    whatever the number of ranks. `schedule` gives each step's learning rate and KL weight;
    skipped[0] counts the updates --skip-grad skipped."""
    tc, mc = config.train, config.model
    every, draws = tc.checkpoint_every, (mc.iwae_k,) if mc.objective == "iwae" else ()
    parameters = [p for p in model.parameters() if p.requires_grad]
    noise_dim = (model.module if hasattr(model, "module") else model).noise_dim    # DDP wraps the model
    for idx in batches[at.batch:]:
        rows = rt.shard(len(idx))
        x = preprocess(images[idx], config.data.binarization, noise_gen)[rows]          # [b,C,H,W], b = len(rows)
        y = None if labels is None else labels[idx][rows]
        # [b,latent], or [K,b,latent] for the iwae objective
        eps = torch.randn(*draws, len(idx), noise_dim, generator=noise_gen, device=images.device)[..., rows, :]
        with rt.autocast():
            terms = model(x, eps=eps, y=y)
        loss_per_example = training_loss(terms, mc.objective, mc.beta * schedule.kl_weight(at.step), tc.kl,
                                         tc.free_bits)                                              # [b]
        # DDP averages gradients over ranks: scaled so, each rank's sum gives the global batch mean's gradient
        loss = loss_per_example.sum() * (rt.world_size / len(idx))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if schedule.varies_lr:
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr(at.step)
        if tc.clip_grad or tc.skip_grad:
            norm = torch.nn.utils.clip_grad_norm_(parameters, tc.clip_grad or math.inf)
            if tc.skip_grad and not norm <= tc.skip_grad:     # a NaN norm is skipped too
                skipped[0] += 1
            else:
                optimizer.step()
        else:
            optimizer.step()
        losses[at.batch] = loss_per_example.detach().sum()
        at.batch += 1
        at.step += 1
        bar.update()
        if not bar.disable and at.batch % 25 == 0:
            bar.set_postfix(loss=f"{loss_per_example.detach().mean().item():.2f}", refresh=False)
        if stop.agreed() or (every and at.step % every == 0):
            return


def _check_finite(losses: torch.Tensor, first: int, at: Progress, run: Run) -> None:
    """Stops training at a NaN or infinite loss among batches first..at.batch, before anything
    of it is saved."""
    bad = torch.nonzero(~torch.isfinite(losses[first:at.batch]))
    if len(bad):
        batch = first + int(bad[0])
        latest = run.checkpoints.latest()
        kept = f"the last good checkpoint, {latest.name}, is kept" if latest else "no checkpoint was written"
        raise RunError(f"the loss is {losses[batch].item()} at step {at.step - at.batch + batch + 1} (epoch "
                       f"{at.epoch + 1}, batch {batch + 1}); training diverged and stopped ({kept}): "
                       "start again with a lower --lr or with --precision fp32")


def _save(run: Run, at: Progress, model, optimizer, order_state: torch.Tensor, noise_gen: torch.Generator,
          losses: torch.Tensor, keep: int) -> None:
    """Checkpoints the unwrapped model at `at`; `order_state` is the order generator's state at the
    start of the epoch `at` is in."""
    run.checkpoints.save(Checkpoint(replace(at), model.state_dict(), optimizer.state_dict(), {
        "torch": torch.get_rng_state(), "order": order_state, "noise": noise_gen.get_state(),
    }, losses[:at.batch].tolist()), keep=keep)


class _PlainProgress:
    """The progress bar's stand-in where the bar is off: a plain line through `log` every
    PROGRESS_SECONDS (train_steps calls update() after each batch)."""
    disable = True

    def __init__(self, log, what: str, total: int, done: int, batch_size: int) -> None:
        self.log, self.what, self.total, self.done, self.batch_size = log, what, total, done, batch_size
        self.started_at, self.start = done, time.monotonic()
        self.last = self.start

    def update(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            rate = (self.done - self.started_at) * self.batch_size / (now - self.start)
            self.log(f"{self.what}: batch {self.done}/{self.total}, {rate:.0f} images/s")


class _StopSignals:
    """SIGINT and SIGTERM ask training to stop after the current step and checkpoint. Ranks agree
    on it after every step, so all stop after the same one. The first signal restores the
    default action: a second one ends the process at once, whatever it is doing, and the newest
    complete checkpoint stays (checkpoints are committed atomically)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.received = 0    # the signal this process had (set by the handler, at any moment)
        self.signum = 0      # the signal the ranks agreed on after the last step: what the loop acts on
        self._previous = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():   # the only thread Python lets set handlers
            self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum: int, frame) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        self.received = signum
        if self.rt.is_main:
            print(f"vaekit: {signal.Signals(signum).name}: stopping after this step to write a checkpoint "
                  "(signal again to exit at once)", file=sys.stderr, flush=True)

    def agreed(self) -> bool:
        """Whether any rank has had a stop signal (then `signum` is the largest one)."""
        self.signum = self.rt.max_all(self.received)
        return bool(self.signum)
