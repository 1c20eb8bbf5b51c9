"""The training loop: short, explicit, resumable. One function per step of an epoch."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from .config import Config
from .data import load_splits, preprocess
from .distributed import Runtime, setup
from .evaluate import evaluate_elbo
from .models import build_model
from .objectives import single_sample_elbo
from .runs import Checkpoint, Run, RunError
from .viz import gif_from_pngs, save_grid

NUM_EXAMPLES_TO_GENERATE = 16   # the seed's 4x4 progress grid


def train(config: Config | None = None, out: str | Path | None = None, resume: str | Path | None = None,
          epochs: int | None = None, log=print) -> Run:
    """Trains a new run in `out` with `config`, or goes on with the run in `resume`
    (from its last completed epoch; `epochs` may extend it). Returns the run."""
    if (resume is None) == (out is None):
        raise ValueError("train() needs exactly one of out= (a new run) or resume= (an existing run)")
    if resume is not None:
        run = Run.open(resume)
        config = run.config()
        if epochs is not None:
            config.train.epochs = epochs
            config.save(run.config_path)
    else:
        config = config or Config()
        run = Run.create(out, config)
    run.lock()
    try:
        _train(run, config, resuming=resume is not None, log=log)
    finally:
        run.unlock()
    return run


def _train(run: Run, config: Config, resuming: bool, log) -> None:
    tc = config.train
    rt = setup(tc.device, tc.precision)
    torch.manual_seed(tc.seed)
    splits = load_splits(config.data.dataset, config.data.data_dir, log=log)
    train_images = splits.train.images.to(rt.device)
    test_images = splits.test.images.to(rt.device)
    if tc.batch_size > len(train_images):
        raise RunError(f"batch_size {tc.batch_size} is larger than the {len(train_images)} training images; "
                       "lower --batch-size")

    # channels_last: the layout oneDNN's and cuDNN's fast convolution kernels want (CPU: +30%)
    model = build_model(config.model).to(rt.device, memory_format=torch.channels_last)
    # not fused=True: on CPU its results vary from run to run (seen in torch 2.13), which would break
    # 'same seed, same metrics' and exact resume
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr)
    order_gen = torch.Generator().manual_seed(tc.seed)          # epoch permutations (CPU)
    noise_gen = rt.generator(tc.seed + 1)                       # reparameterization, dynamic binarization

    start_epoch, step = 0, 0
    if resuming and run.latest_checkpoint() is not None:
        ckpt = run.load_checkpoint()
        model.load_state_dict(ckpt.model)
        optimizer.load_state_dict(ckpt.optimizer)
        torch.set_rng_state(ckpt.rng["torch"])
        order_gen.set_state(ckpt.rng["order"])
        noise_gen.set_state(ckpt.rng["noise"])
        start_epoch, step = ckpt.epoch, ckpt.step
        run.truncate_metrics(start_epoch)
        log(f"Resuming {run.path} after epoch {start_epoch} (step {step})")
    else:
        fixed_z = torch.randn(NUM_EXAMPLES_TO_GENERATE, config.model.latent_dim,
                              generator=torch.Generator().manual_seed(tc.seed + 2))
        run.save_fixed_z(fixed_z)
        save_grid(model.sample(fixed_z.to(rt.device)).detach(), run.image_path(0))
    fixed_z = run.fixed_z().to(rt.device)

    log(f"Training {run.path} on {rt.device.type} ({rt.precision}): {len(train_images)} train / "
        f"{len(test_images)} test images, epochs {start_epoch + 1}..{tc.epochs}")
    for epoch in range(start_epoch + 1, tc.epochs + 1):
        start_time = time.perf_counter()
        train_loss, steps = train_epoch(model, optimizer, train_images, config, rt, order_gen, noise_gen,
                                        desc=f"epoch {epoch}/{tc.epochs}")
        end_time = time.perf_counter()
        step += steps
        test = evaluate_elbo(model, test_images, config.data.binarization, rt, tc.eval_batch_size,
                             seed=tc.seed * 1_000_003 + epoch)
        eval_seconds = time.perf_counter() - end_time
        log("============================")
        log(f"Epoch: {epoch}, Test set ELBO: {test['elbo']:.2f}, "
            f"time elapse for current epoch {end_time - start_time:.1f}")
        with torch.inference_mode():
            save_grid(model.sample(fixed_z), run.image_path(epoch))
        run.append_metrics({
            "epoch": epoch, "step": step, "train_loss": train_loss,
            "test_elbo": test["elbo"], "test_distortion": test["distortion"], "test_rate": test["rate"],
            "epoch_seconds": round(end_time - start_time, 3), "eval_seconds": round(eval_seconds, 3),
            "images_per_second": round(len(train_images) / (end_time - start_time), 1),
        })
        run.save_checkpoint(Checkpoint(epoch, step, model.state_dict(), optimizer.state_dict(), {
            "torch": torch.get_rng_state(), "order": order_gen.get_state(), "noise": noise_gen.get_state(),
        }), keep=tc.keep_checkpoints)
    gif_from_pngs(sorted(run.images.glob("image_at_epoch_*.png")), run.gif_path)
    log(f"Done: {run.path} (grid images in {run.images}, animation {run.gif_path})")


def train_epoch(model, optimizer, images: torch.Tensor, config: Config, rt: Runtime,
                order_gen: torch.Generator, noise_gen: torch.Generator, desc: str = "") -> tuple[float, int]:
    """One pass over `images` (uint8, on the device) in a fresh random order, keeping the
    last partial batch as the seed's tf.data pipeline does. Returns (mean loss, steps)."""
    batch_size = config.train.batch_size
    order = torch.randperm(len(images), generator=order_gen).to(images.device)
    batches = order.split(batch_size)
    loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, disable=None, dynamic_ncols=True)
    start = time.perf_counter()
    for i, idx in enumerate(bar, 1):
        x = preprocess(images[idx], config.data.binarization, noise_gen)
        with rt.autocast():
            logits, z, mean, logvar = model(x, noise_gen)
        loss = -single_sample_elbo(x, logits, z, mean, logvar).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(idx)
        if not bar.disable and (i % 25 == 0 or i == len(batches)):
            seen = min(i * batch_size, len(images))
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.2f}",
                            img_s=f"{seen / (time.perf_counter() - start):.0f}", refresh=False)
    return loss_sum.item() / len(images), len(batches)
