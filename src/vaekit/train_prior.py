"""The vq family's second stage: `vaekit train-prior RUN` fits the code prior (a causal
transformer over the code grid, models/code_prior.py) to the codes that the run's frozen first
stage gives its training images, in RUN/prior/.

RUN/prior/ is laid out as a run's own checkpoints/, metrics.jsonl and images/ (a grid of fixed
prior draws, decoded, per epoch), plus stage.json: the SHA-256 of the first stage's weights the
prior was fitted to and its epochs. A prior belongs to those weights: when the first stage trains
on, its codes change, and the prior is refused until it is trained again.

The loop is train.py's pattern, smaller: a Progress with the epoch-order generator's state at the
start of the epoch, so a resume draws the same permutation, skips the batches done and goes on
with the same noise (dynamic binarization draws each step's images afresh; their codes are the
prior's data): a resumed prior equals an uninterrupted one bit for bit. One process, fp32.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .checkpoints import Checkpoint, Progress
from .data import hold_out, preprocess
from .errors import ConfigError
from .evaluate import vq_report
from .files import sha256
from .loading import check_prior_fits, open_for_inference
from .models.code_prior import CodePrior, PriorConfig, prior_train_step
from .runs import Run, parse_run_name
from .train import NUM_EXAMPLES_TO_GENERATE, epoch_seed, say
from .viz import save_grid

def train_prior(run: str | Path, epochs: int | None = None, log=say) -> Run:
    """Trains (or goes on training) the code prior of the vq run `run` up to `epochs` epochs
    (default: what it was started with, else the run's own --epochs), with the run's batch size,
    learning rate, seed and device. Returns the prior's stage (a Run in RUN/prior/)."""
    name = parse_run_name(run)
    if name.at_checkpoint:
        raise ConfigError(f"the prior is fitted to a run's newest weights: pass {name.path} without {name.at_checkpoint}")
    opened = open_for_inference(run, device=Run.open(name).config().train.device, precision="fp32")
    config, vq, rt = opened.config, opened.model, opened.runtime
    if config.model.family != "vq":
        raise ConfigError(f"{run} is a {config.model.family} model: train-prior fits the code prior of a "
                          "`--family vq` run")
    tc = config.train
    stage = opened.run.prior_stage
    record = opened.run.stage_record()
    check_prior_fits(opened.run, opened.weights)
    epochs = epochs if epochs is not None else (record["epochs"] if record else tc.epochs)
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    stage.path.mkdir(exist_ok=True)
    stage.lock()     # before anything is written: refuses a shipped model's prior and a second process
    try:
        splits = opened.data()
        train_images, _ = hold_out(splits.train, config.data.validation)
        test_images = splits.test.images.to(rt.device)
        stage.images.mkdir(exist_ok=True)
        stage.checkpoints.path.mkdir(exist_ok=True)
        torch.manual_seed(tc.seed)
        prior = CodePrior(PriorConfig.for_model(vq)).to(rt.device)
        optimizer = torch.optim.Adam(prior.parameters(), lr=tc.lr)
        order_gen, noise_gen = torch.Generator().manual_seed(tc.seed), rt.generator(tc.seed + 1)
        generators = {"torch": torch.default_generator, "order": order_gen, "noise": noise_gen}
        at, step_losses = Progress(), []
        latest, _ = stage.checkpoints.find()
        if latest is not None:
            ckpt = stage.checkpoints.load(latest)
            ckpt.restore(prior, optimizer, generators, latest)
            at, step_losses = ckpt.progress, ckpt.step_losses
            if epochs < at.epoch:
                raise ConfigError(f"--epochs {epochs} is fewer than the {at.epoch} epochs {stage.path} has done")
        opened.run.save_stage_record(sha256(opened.weights), epochs)
        if at.epoch == epochs:
            log(f"Nothing to do: {stage.path} has done its {epochs} epochs; `vaekit train-prior {opened.run.path} "
                "--epochs N` trains on to epoch N")
            return stage
        stage.truncate_metrics(at.epoch)
        log(f"Training the code prior of {opened.run.path} in {stage.path} on {rt.device.type}: "
            f"{len(train_images)} training images' codes, epochs {at.epoch + 1}..{epochs}")
        _prior_loop(stage, config, vq, prior, optimizer, order_gen, noise_gen, at, step_losses, epochs,
                    train_images.images, test_images, log)
    finally:
        stage.unlock()
    log(f"Done: {stage.path} (draws in {stage.images}); `vaekit sample {opened.run.path}` decodes prior draws")
    return stage


def _prior_loop(stage: Run, config, vq, prior: CodePrior, optimizer, order_gen: torch.Generator,
                noise_gen: torch.Generator, at: Progress, step_losses: list[float], epochs: int,
                train_images: torch.Tensor, test_images: torch.Tensor, log) -> None:
    """The epochs from where `at` stands to `epochs`: each step fits the prior to the codes of a
    batch of `train_images` (uint8, CPU), binarized from `noise_gen`; a checkpoint every
    --checkpoint-every steps and at each epoch's end, with its metrics line and grid."""
    tc, device = config.train, test_images.device
    fixed_draws = torch.Generator(device).manual_seed(tc.seed + 2)
    for epoch in range(at.epoch + 1, epochs + 1):
        epoch_order = order_gen.get_state()
        batches = torch.randperm(len(train_images), generator=order_gen).split(tc.batch_size)   # CPU
        start = time.perf_counter()
        for idx in batches[at.batch:]:
            x = preprocess(train_images[idx].to(device), config.data.binarization, noise_gen)   # [B,C,H,W]
            step_losses.append(prior_train_step(prior, optimizer, vq.codes(x)) * len(idx))
            at = Progress(at.epoch, at.batch + 1, at.step + 1)
            if tc.checkpoint_every and at.step % tc.checkpoint_every == 0 and at.batch < len(batches):
                _save(stage, prior, optimizer, noise_gen, epoch_order, at, step_losses, tc)
        seconds = time.perf_counter() - start
        train_nll = sum(step_losses) / len(train_images)        # the epoch's mean -log p(c), nats per image
        at, step_losses = Progress(epoch, 0, at.step), []
        prior.eval()
        x = preprocess(test_images, config.data.binarization, torch.Generator(device).manual_seed(
            epoch_seed(tc.seed, epoch)))
        with torch.inference_mode():
            test_nll = -prior.log_prob(vq.codes(x)).double().mean().item()
        bound = vq_report(vq, x, config.data.binarization, tc.eval_batch_size, prior)["elbo"]
        record = {"epoch": epoch, "step": at.step, "prior_nll": train_nll, "test_prior_nll": test_nll,
                  "test_bound": bound, "epoch_seconds": round(seconds, 3)}
        log(f"Prior epoch {epoch}: test -log p(codes) {test_nll:.2f}, test bound {bound:.2f} nats, {seconds:.1f} s")
        draws = prior.sample(NUM_EXAMPLES_TO_GENERATE, fixed_draws.manual_seed(tc.seed + 2))
        save_grid(vq.decode_indices(draws, as_image=True), stage.image_path(epoch))
        stage.append_metrics(record)
        _save(stage, prior, optimizer, noise_gen, order_gen.get_state(), at, step_losses, tc)


def _save(stage: Run, prior: CodePrior, optimizer, noise_gen: torch.Generator, epoch_order: torch.Tensor,
          at: Progress, step_losses: list[float], tc) -> None:
    """A checkpoint of the prior's stage; `epoch_order`: order_gen's state at the start of the
    epoch `at` is in, so a resume redraws its permutation."""
    rng = {"torch": torch.get_rng_state(), "order": epoch_order, "noise": noise_gen.get_state()}
    stage.checkpoints.save(Checkpoint(at, prior.state_dict(), optimizer.state_dict(), rng, list(step_losses)),
                           keep=tc.keep_checkpoints)
