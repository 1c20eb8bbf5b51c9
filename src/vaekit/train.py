"""The training loop: short, explicit, resumable; the same code on one process or N torchrun ranks.

Read it top to bottom: `train` opens the run; `_train` runs `_start`, which reads the data,
builds the model and restores a TrainState (everything training changes, in the open), then
`_train_loop`, the one loop over epochs and batches: it calls `train_step` for each optimisation
step, checkpoints when due, stops on a signal, and at each epoch's end scores the held-out data,
draws the grid and writes the metrics line and the checkpoint.

Where training stands is a Progress (epochs done, batches of the next epoch done, steps). A
checkpoint holds it with the epoch-order generator's state at the start of that epoch, so a
resume draws the same permutation, skips the batches done and goes on with the same noise:
its weights equal an uninterrupted run's, bit for bit.

Across ranks the configured batch is the global batch. Every rank draws the same permutation
and the same noise for the whole global batch, then trains on its own rows of it, so the result
does not depend on the number of ranks (up to float rounding in the gradient all-reduce).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .checkpoints import Checkpoint, Progress
from .compiling import for_training
from .config import Config
from .data import ImageData, Splits, check_data_fits, fingerprint, hold_out, preprocess, splits_for
from .distributed import Runtime, restartable_job, restarted, setup
from .errors import ConfigError, Interrupted, RunError, handling
from .evaluate import elbo_report, iwae_bounds, vq_report
from .models import ModelConfig, build_model
from .models.vq_vae import codebook_usage, update_codebook, vq_loss
from .objectives import training_loss
from .runs import BEST_SUFFIX, Run, parse_run_name
from .schedule import EarlyStop, Schedule
from .viz import gif_from_pngs, save_grid

NUM_EXAMPLES_TO_GENERATE = 16   # the seed's 4x4 progress grid
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PROGRESS_SECONDS = 60           # without a progress bar (stderr not a terminal): a plain line this often


def say(message: str) -> None:
    """train's default log: stdout, flushed, so `vaekit train > log` or `| tee log` shows each line
    when it is written rather than when the run ends."""
    print(message, flush=True)


def warn(message: str) -> None:
    """train's warnings (the data's, a damaged checkpoint set aside): stderr, leaving stdout to the log."""
    print(message, file=sys.stderr, flush=True)


def train(config: Config | None = None, out: str | Path | None = None, resume: str | Path | None = None,
          epochs: int | None = None, log=say, data_dir: str | Path | None = None, fall_back: bool = False) -> Run:
    """Trains a new run in `out` with `config` (which is copied, never changed), or goes on with
    the run in `resume` from its newest checkpoint (`epochs` may extend it; `data_dir` names where
    its data is now, which must be the data it was trained on; `fall_back`: from the newest intact
    checkpoint when newer ones are damaged, moving those to checkpoints/set-aside/). Returns the
    run. The run directory of a new run is made once its data and model are known good, and
    removed again when training fails before its first checkpoint.

    Under torchrun every rank calls this; rank 0 alone writes the run directory. When torchrun
    restarts the ranks (--max-restarts: after a failure here or on another machine), `out` holding
    a run of this very config that this job made (Run.made_by; on one machine, any restart) is
    resumed rather than refused. Raises RunError, ConfigError or DataError with a one-line
    message, and Interrupted after a stop signal (a checkpoint is written first)."""
    if (resume is None) == (out is None):
        raise ValueError("train() needs exactly one of out= (a new run) or resume= (an existing run)")
    config = config.checked_copy() if config is not None else Config()     # the caller's is left as it was
    job = restartable_job()
    if out is not None and (Run(out).made_by(job) or restarted() and Run(out).config_path.is_file()) \
            and _same_config(Run(out).config(), config):
        resume, out = out, None
    if resume is not None:
        name = parse_run_name(resume)
        if name.at_checkpoint:
            raise ConfigError(f"--resume goes on from a run's newest checkpoint: pass {name.path} without "
                              f"{name.at_checkpoint}")
        run = Run.open(resume)
        config = run.config()
        if epochs is not None:
            config.train = replace(config.train, epochs=epochs)   # checked as the flag of a new run is
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
        # its traceback holds the loop's frames, and so DDP's reducer: without them, rt.close()
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


@dataclass
class TrainState:
    """Everything training changes, and all a checkpoint holds (with the global torch generator's
    state): this rank's model, optimizer and generators, where training stands, and the epoch's
    step losses so far."""
    model: torch.nn.Module          # the plain model: checkpoints, evaluation and the grid use it
    ddp_model: torch.nn.Module      # what steps run: DistributedDataParallel around `model` across ranks, else `model`
    optimizer: torch.optim.Optimizer
    order_gen: torch.Generator      # draws each epoch's permutation (CPU)
    noise_gen: torch.Generator      # reparameterization and dynamic binarization noise (on the device)
    at: Progress
    epoch_order: torch.Tensor       # order_gen's state at the start of the epoch `at` is in: a resume redraws its order
    step_losses: torch.Tensor       # [batches of the epoch] float64 on the device, the first at.batch filled: each
    #                                 step's loss summed over the global batch (over this rank's rows until the loop
    #                                 sums them over ranks, before each checkpoint)

    def checkpoint(self) -> Checkpoint:
        """A checkpoint of where training stands, for an exact resume."""
        rng = {"torch": torch.get_rng_state(), "order": self.epoch_order, "noise": self.noise_gen.get_state()}
        return Checkpoint(replace(self.at), self.model.state_dict(), self.optimizer.state_dict(), rng,
                          self.step_losses[:self.at.batch].tolist())


@dataclass
class _TrainingData:
    """What training reads: the images it trains on, uint8 on the CPU (a batch at a time goes to
    the device), the test images on the device (with their labels for a class-conditional model,
    else None), and the validation split held out of the training set (on the CPU)."""
    train_images: torch.Tensor      # [N,C,H,W] uint8, CPU (possibly a memory map)
    train_labels: torch.Tensor | None
    test_images: torch.Tensor       # [M,C,H,W] uint8, on the device
    test_labels: torch.Tensor | None
    val_split: ImageData


class Step(NamedTuple):
    """What one optimisation step produced on this rank."""
    loss_sum: torch.Tensor   # 0-d float64 on the device: the loss summed over this rank's rows of the batch
    images: int              # this rank's rows of the global batch
    skipped: bool            # --skip-grad skipped the update (its gradient norm was too large, or not finite)


def train_step(state: TrainState, images: torch.Tensor, labels: torch.Tensor | None, config: Config, rt: Runtime,
               schedule: Schedule) -> Step:
    """One optimisation step of `state` on a global batch: `images` uint8 [B,C,H,W] on the device
    (and `labels` [B] for a conditional model). The step's learning rate and KL weight are the
    schedule's at state.at.step; the caller advances state.at.

    Each rank trains on its rows of the global batch, but binarization and reparameterization
    noise are drawn for the whole global batch on every rank: each example gets the same draws
    whatever the number of ranks."""
    tc, mc = config.train, config.model
    if mc.family == "vq":
        return _vq_train_step(state, images, config, rt, schedule)
    rows = rt.shard(len(images))
    x = preprocess(images, config.data.binarization, state.noise_gen)[rows]          # [b,C,H,W], b = len(rows)
    y = None if labels is None else labels[rows]
    draws = (mc.iwae_k,) if mc.objective == "iwae" else ()
    # [b,latent], or [K,b,latent] for the iwae objective
    eps = torch.randn(*draws, len(images), state.model.noise_dim, generator=state.noise_gen,
                      device=images.device)[..., rows, :]
    with rt.autocast():
        terms = state.ddp_model(x, eps=eps, y=y)
    loss_per_example = training_loss(terms, mc.objective, mc.beta * schedule.kl_weight(state.at.step), tc.kl,
                                     tc.free_bits)                                                   # [b]
    # DDP averages gradients over ranks: scaled so, each rank's sum gives the global batch mean's gradient
    loss = loss_per_example.sum() * (rt.world_size / len(images))
    skipped = _optimizer_step(state, loss, tc, schedule)
    return Step(loss_per_example.detach().sum().double(), len(x), skipped)


def _vq_train_step(state: TrainState, images: torch.Tensor, config: Config, rt: Runtime, schedule: Schedule) -> Step:
    """train_step for the vq family: the gradient step of the global batch mean of vq_loss
    (distortion + commitment; the decoder's gradient reaches the encoder straight through the
    quantiser), then the codebook's EMA update and dead-code restarts (update_codebook: across
    ranks, the statistics summed and the restarts drawn among all ranks' encoder outputs), drawn
    from the noise generator, whose state every checkpoint keeps and which every rank holds in
    the same state. A skipped step (--skip-grad) leaves the codebook as it was too."""
    rows = rt.shard(len(images))
    x = preprocess(images, config.data.binarization, state.noise_gen)[rows]          # [b,C,H,W], b = len(rows)
    with rt.autocast():
        terms = state.ddp_model(x)
    loss_per_example = vq_loss(terms)                                                 # [b]
    # DDP averages gradients over ranks: scaled so, each rank's sum gives the global batch mean's gradient
    loss = loss_per_example.sum() * (rt.world_size / len(images))
    skipped = _optimizer_step(state, loss, config.train, schedule)
    if not skipped:
        update_codebook(state.model, terms, state.noise_gen)
    return Step(loss_per_example.detach().sum().double(), len(x), skipped)


def _optimizer_step(state: TrainState, loss: torch.Tensor, tc, schedule: Schedule) -> bool:
    """Backward of `loss`, the schedule's learning rate, --clip-grad and --skip-grad, then the
    optimizer's step. Returns whether the update was skipped."""
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if schedule.varies_lr:
        for group in state.optimizer.param_groups:
            group["lr"] = schedule.lr(state.at.step)
    skipped = False
    if tc.clip_grad or tc.skip_grad:
        parameters = [p for p in state.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(parameters, tc.clip_grad or math.inf)
        skipped = bool(tc.skip_grad and not norm <= tc.skip_grad)     # a NaN norm is skipped too
    if not skipped:
        state.optimizer.step()
    return skipped


def _train(run: Run, config: Config, rt: Runtime, resuming: bool, fall_back: bool, log) -> None:
    """This rank's share of `train`: the setup, then the loop. The TrainState lives in this frame
    alone, so its DDP wrapper is gone before `train` closes the process group (a wrapper freed at
    interpreter exit can abort the rank)."""
    started = _start(run, config, rt, resuming, fall_back, log)
    if started is not None:
        state, data, board, unsaved_config = started
        _train_loop(run, config, rt, log, state, data, board, unsaved_config)


def _start(run: Run, config: Config, rt: Runtime, resuming: bool, fall_back: bool, log
           ) -> tuple[TrainState, _TrainingData, object, bool] | None:
    """This rank's setup: the data and the model (restored from the run's checkpoint when
    `resuming`), the run directory (rank 0), the grid's codes. Returns what _train_loop takes
    after (run, config, rt, log), or None when the run has done its epochs."""
    tc = config.train
    config.check_processes(rt.world_size)
    with rt.local_main_first():    # one download per machine; the other ranks then read the cache
        splits = splits_for(config.data, log=warn if rt.is_main else _silent)
    if config.model.conditional and not config.model.num_classes:
        config.model.num_classes = splits.num_classes     # saved in config.json below
    check_data_fits(config.model, splits, config.data.data_dir or config.data.dataset)
    torch.manual_seed(tc.seed)
    # channels_last: the layout oneDNN's and cuDNN's fast convolution kernels want (CPU: +30%)
    model = build_model(config.model).to(rt.device, memory_format=torch.channels_last)
    # fused: one kernel for all parameters instead of ~10 per tensor (CPU: 0.7 -> 0.3 ms a step)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, eps=tc.adam_eps, fused=True)
    order_gen = torch.Generator().manual_seed(tc.seed)
    noise_gen = rt.generator(tc.seed + 1)
    generators = {"torch": torch.default_generator, "order": order_gen, "noise": noise_gen}
    at, step_losses, latest, damaged = (_restore(run, model, optimizer, generators, tc.epochs, fall_back) if resuming
                                        else (Progress(), [], None, []))
    if latest is not None:
        if tc.epochs == at.epoch:
            log(f"Nothing to do: {run.path} has done its {at.epoch} epochs; `vaekit train --resume {run.path} "
                "--epochs N` trains on to epoch N")
            return None
        log(f"Resuming {run.path} from {latest.name} (step {at.step}: epoch {at.epoch + 1}, batch {at.batch})")
    data = _training_data(splits, config, rt)
    data_fingerprint = fingerprint(splits)
    if resuming:
        run.check_data(data_fingerprint, config.data.data_dir or config.data.dataset)
    if rt.is_main:
        if not resuming:
            run.make(config, data_fingerprint, restartable_job())   # data and model known good: now the run directory
            run.lock()
        for path in damaged:                     # --fall-back: the damaged checkpoints go out of the way, kept
            warn(f"warning: set {path.name} aside as {run.checkpoints.set_aside(path)} (damaged); "
                 f"going on from {latest.name}")
        if resuming and latest is None:
            _start_again(run)
        run.truncate_metrics(at.epoch)
        if latest is None and config.model.family != "vq":
            fixed_z = torch.randn(NUM_EXAMPLES_TO_GENERATE, model.noise_dim,
                                  generator=torch.Generator().manual_seed(tc.seed + 2))
            run.save_fixed_z(fixed_z)
        if latest is None:
            save_grid(progress_grid(model, config, run, splits.test.images.to(rt.device), rt), run.image_path(0))
    board = _open_board(run, at.epoch) if rt.is_main and tc.tensorboard else None
    if board and latest is None:
        _log_board(board, 0, {}, run.image_path(0))
    stepped = for_training(model, tc.compile, rt, log)   # --compile: DDP wraps the compiled module
    state = TrainState(model, rt.wrap(stepped), optimizer, order_gen, noise_gen, at, order_gen.get_state(),
                       torch.tensor(step_losses, dtype=torch.float64, device=rt.device))
    # a resume's changed settings (--epochs, --data-dir) reach config.json with its first
    # checkpoint: a resume that fails before it leaves config.json as it was
    unsaved_config = resuming and config != run.config()
    return state, data, board, unsaved_config


def _train_loop(run: Run, config: Config, rt: Runtime, log, state: TrainState, data: _TrainingData,
                board, unsaved_config: bool) -> None:
    """Trains the epochs still to train from where `state` stands. Every `checkpoint_every` steps
    and after a stop signal rank 0 checkpoints (then Interrupted is raised on every rank); after
    each epoch rank 0 scores the held-out data, draws the progress grid and writes the
    metrics line (to `board` too, with --tensorboard), the best checkpoint and the epoch's
    checkpoint. `unsaved_config`: config.json is written with the first checkpoint."""
    tc = config.train
    schedule = Schedule(tc, steps_per_epoch=-(-len(data.train_images) // tc.batch_size))
    stopping = EarlyStop(tc.early_stop, run.metrics() if rt.is_main else [])
    if rt.max_all(int(rt.is_main and stopping.due())):
        log(f"Nothing to do: {run.path} stopped early after epoch {stopping.last_epoch} (best validation ELBO "
            f"{stopping.best:.2f} at epoch {stopping.best_epoch}); its weights: {run.path}{BEST_SUFFIX}")
        return
    processes = f"{rt.world_size} processes on {rt.device.type}" if rt.world_size > 1 else rt.device.type
    validation = f"{len(data.val_split)} validation / " if len(data.val_split) else ""
    log(f"Training {run.path} on {processes} ({rt.precision}): {len(data.train_images)} train / {validation}"
        f"{len(data.test_images)} test images, epochs {state.at.epoch + 1}..{tc.epochs}")

    def save_checkpoint() -> None:    # rank 0; config.json first, when a resume changed it
        nonlocal unsaved_config
        if unsaved_config:
            run.save_config(config)
            unsaved_config = False
        run.checkpoints.save(state.checkpoint(), keep=tc.keep_checkpoints, keep_every=tc.keep_every)

    with _StopSignals(rt) as stop:
        for epoch in range(state.at.epoch + 1, tc.epochs + 1):
            state.epoch_order = state.order_gen.get_state()
            if config.model.family == "vq" and state.at.batch == 0:   # mid-epoch, the checkpoint has the usage so far
                state.model.codebook.start_epoch()
            batches = torch.randperm(len(data.train_images), generator=state.order_gen).split(tc.batch_size)  # CPU
            if state.at.batch > len(batches):
                raise RunError(f"the checkpoint is at batch {state.at.batch} of an epoch that now has {len(batches)}; "
                               "the training data changed since")
            to_do = len(batches) - state.at.batch
            state.step_losses = torch.cat([state.step_losses, state.step_losses.new_zeros(to_do)])
            first_batch, summed, skipped, start_time = state.at.batch, state.at.batch, 0, time.perf_counter()
            with _progress_bar(log, f"epoch {epoch}/{tc.epochs}", len(batches), state.at.batch, tc.batch_size,
                               rt) as bar:
                for idx in batches[state.at.batch:]:                   # [B] indices of a global batch
                    labels = None if data.train_labels is None else data.train_labels[idx].to(rt.device)
                    step = train_step(state, data.train_images[idx].to(rt.device, non_blocking=True), labels,
                                      config, rt, schedule)
                    state.step_losses[state.at.batch] = step.loss_sum
                    skipped += step.skipped
                    state.at.batch += 1
                    state.at.step += 1
                    bar.update()
                    if not bar.disable and state.at.batch % 25 == 0:
                        bar.set_postfix(loss=f"{step.loss_sum.item() / step.images:.2f}", refresh=False)
                    # every rank asks every step (a collective): all stop after the same one
                    if not (stop.agreed() or (tc.checkpoint_every and state.at.step % tc.checkpoint_every == 0)
                            or state.at.batch == len(batches)):
                        continue
                    rt.sum_all(state.step_losses[summed:state.at.batch])   # this rank's sums -> the global batches'
                    _check_finite(state.step_losses, summed, state.at, run)
                    summed = state.at.batch
                    if rt.is_main and (stop.signum or state.at.batch < len(batches)):
                        save_checkpoint()
                    if stop.signum:
                        rt.barrier()   # a rank that exits makes torchrun stop the others: not before rank 0 saved
                        message = (f"Stopped by {signal.Signals(stop.signum).name} after step {state.at.step} "
                                   f"(checkpoint {state.at.checkpoint_name}); go on with "
                                   f"`vaekit train --resume {run.path}`")
                        log(message)
                        raise Interrupted(stop.signum, message)
            seconds = time.perf_counter() - start_time
            train_loss = state.step_losses.sum().item() / len(data.train_images)
            trained_images = sum(len(idx) for idx in batches[first_batch:])
            state.at, state.epoch_order = Progress(epoch, 0, state.at.step), state.order_gen.get_state()
            state.step_losses = state.step_losses.new_zeros(0)
            if rt.is_main:
                start = time.perf_counter()
                # the test set is small: rank 0 evaluates all of it, with the single-process noise
                held_out = held_out_record(state.model, config, rt, epoch, data.test_images, data.test_labels,
                                           data.val_split)
                eval_seconds = time.perf_counter() - start
                log("============================")
                log(f"Epoch: {epoch}, Test set ELBO: {held_out['test_elbo']:.2f}, time elapse for current epoch "
                    f"{seconds:.1f}")
                save_grid(progress_grid(state.model, config, run, data.test_images, rt), run.image_path(epoch))
                usage = codebook_usage(state.model) if config.model.family == "vq" else {}
                record = {
                    "epoch": epoch, "step": state.at.step, "train_loss": train_loss, **held_out, **usage,
                    "epoch_seconds": round(seconds, 3), "eval_seconds": round(eval_seconds, 3),
                    "images_per_second": round(trained_images / seconds, 1), "lr": schedule.lr(state.at.step - 1),
                    **({"skipped_updates": skipped} if tc.skip_grad else {}),
                }
                run.append_metrics(record)
                if stopping.record(record):
                    run.checkpoints.save_best(state.model.state_dict(), epoch, record["val_elbo"])
                if board:
                    _log_board(board, epoch, record, run.image_path(epoch))
                save_checkpoint()
            if rt.max_all(int(rt.is_main and stopping.due())):    # rank 0 decides; every rank stops with it
                log(f"Early stop after epoch {epoch}: no better validation ELBO for {tc.early_stop} epochs (best "
                    f"{stopping.best:.2f} at epoch {stopping.best_epoch}; its weights: {run.path}{BEST_SUFFIX})")
                break
    if board:
        board.close()
    if rt.is_main:
        gif_from_pngs(sorted(run.images.glob("image_at_epoch_*.png")), run.gif_path)
        log(f"Done: {run.path} (grid images in {run.images}, animation {run.gif_path})")


@torch.inference_mode()
def progress_grid(model, config: Config, run: Run, test_images: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """The progress grid's 16 images [16,C,H,W]: decodes of the run's fixed z; for the vq family,
    whose prior is trained after it (`vaekit train-prior`), reconstructions of the first 16 test
    images (`test_images` uint8 on the device), binarized from a seed of --seed."""
    if config.model.family == "vq":
        gen = rt.generator(config.train.seed + 2)
        return model.reconstruct(preprocess(test_images[:NUM_EXAMPLES_TO_GENERATE], config.data.binarization, gen))
    fixed_z = run.fixed_z().to(rt.device)
    return model.decode_prior(fixed_z, y=_grid_labels(config.model, rt.device))


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s held-out scoring, from --seed (at most config.SEED_LIMIT, so
    this stays far below the 2**64 torch takes)."""
    return seed * 1_000_003 + epoch


def held_out_record(model, config: Config, rt: Runtime, epoch: int, test_images: torch.Tensor,
                    test_labels: torch.Tensor | None, val_split: ImageData) -> dict:
    """The end of an epoch's numbers on the data it did not train on: the test set's ELBO (at beta
    1, whatever the training objective), distortion and rate (of each layer too, for a hierarchy:
    test_rate_per_layer, top first), bits per dimension for grey levels,
    the IWAE bound the iwae objective trains (with its K draws), and with a validation split its
    val_elbo, val_distortion and val_rate. `test_images` uint8 [M,C,H,W] on the device (and their
    labels for a conditional model). The held-out sets are binarised afresh each epoch from a
    seed of the epoch, whose generator then draws z."""
    binarization, batch_size = config.data.binarization, config.train.eval_batch_size
    seed = epoch_seed(config.train.seed, epoch)
    gen = rt.generator(seed)
    x = preprocess(test_images, binarization, gen)                                 # [M,C,H,W]
    if config.model.family == "vq":
        record = {f"test_{key}": value for key, value in vq_report(model, x, binarization, batch_size).items()}
        if len(val_split):
            x = preprocess(val_split.images.to(rt.device), binarization, rt.generator(seed + 1))
            val = vq_report(model, x, binarization, batch_size)
            record.update({f"val_{key}": val[key] for key in ("elbo", "distortion", "rate")})
        return record
    test = elbo_report(model, x, binarization, rt, gen, batch_size, test_labels)
    record = {f"test_{key}": test[key] for key in ("elbo", "distortion", "rate", "rate_per_layer", "bits_per_dim")
              if key in test}
    if config.model.objective == "iwae":
        k = config.model.iwae_k
        bounds = iwae_bounds(model, x, k, seed + 1, batch_size, test_labels)   # [M]
        record[f"test_iwae_bound_k{k}"] = bounds.double().mean().item()
    if len(val_split):
        gen = rt.generator(seed + 1)
        x = preprocess(val_split.images.to(rt.device), binarization, gen)
        val_labels = val_split.labels.to(rt.device) if config.model.conditional else None
        val = elbo_report(model, x, binarization, rt, gen, batch_size, val_labels)
        record.update({f"val_{key}": val[key] for key in ("elbo", "distortion", "rate")})
    return record


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


def _start_again(run: Run) -> None:
    """A resume of a run with no checkpoint (killed before its first, or its checkpoints/ deleted)
    trains it from epoch 1, as torchrun's restart of a new run does: said on stderr, and the
    metrics lines of the training before, if any, set aside (Run.set_metrics_aside) rather than dropped."""
    aside = run.set_metrics_aside()
    kept = f"; its metrics.jsonl lines are kept in {aside}" if aside else ""
    warn(f"warning: {run.path} has no checkpoint to resume from: training it from epoch 1{kept}")


def _same_config(saved: Config, config: Config) -> bool:
    """Whether a run's config.json holds `config`, counting the classes a conditional run's file
    learned from the data as given."""
    if config.model.conditional and not config.model.num_classes:
        config = replace(config, model=replace(config.model, num_classes=saved.model.num_classes))
    return saved == config


def _silent(*_) -> None:
    """The log of ranks other than 0: one process speaks for the job."""


def _training_data(splits: Splits, config: Config, rt: Runtime) -> _TrainingData:
    """The splits as training reads them; RunError when the batch does not fit them."""
    train_split, val_split = hold_out(splits.train, config.data.validation)
    conditional, batch_size = config.model.conditional, config.train.batch_size
    data = _TrainingData(train_split.images, train_split.labels if conditional else None,
                         splits.test.images.to(rt.device), splits.test.labels.to(rt.device) if conditional else None,
                         val_split)
    if batch_size > len(data.train_images):
        raise RunError(f"batch_size {batch_size} is larger than the {len(data.train_images)} training images; "
                       "lower --batch-size")
    return data


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


def _grid_labels(config: ModelConfig, device: torch.device) -> torch.Tensor | None:
    """The labels of the progress grid's images: classes in turn for a conditional model, else None."""
    if not config.conditional:
        return None
    return torch.arange(NUM_EXAMPLES_TO_GENERATE, device=device) % config.num_classes


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


@contextlib.contextmanager
def _progress_bar(log, what: str, total: int, done: int, batch_size: int, rt: Runtime):
    """The epoch's progress on rank 0: tqdm's bar where stderr is a terminal, else (a log file, a
    pipe, a batch job) a plain line through `log` every PROGRESS_SECONDS. It counts batches, shown
    as images (and images/s) by scaling with the batch size."""
    with tqdm(total=total, initial=done, desc=what, unit="img", unit_scale=batch_size, leave=False,
              disable=None if rt.is_main else True, dynamic_ncols=True) as bar:
        yield _PlainProgress(log, what, total, done, batch_size) if bar.disable else bar


class _PlainProgress:
    """The progress bar's stand-in where the bar is off: a plain line through `log` every
    PROGRESS_SECONDS (the loop calls update() after each batch)."""
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
        self._handling = handling(STOP_SIGNALS, self._on_signal)

    def __enter__(self) -> "_StopSignals":
        self._handling.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._handling.__exit__(*exc)

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
