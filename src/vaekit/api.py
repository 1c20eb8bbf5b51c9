"""Task-level functions over run directories: what the CLI calls, one function per command."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .compiling import log_weights
from .config import BINARIZATIONS, COMPILE_MODES
from .data import dataset_info, fetch, preprocess
from .errors import ConfigError
from .eval_workers import EvalWorkers, check_workers, threads, threads_per_worker
from .evaluate import (RESUMABLE_FROM, decode_batch_for, likelihood_report, max_draws, paired_differences, protocol,
                       vq_eval_report)
from .export import export_run
from .generate import (INPAINT_METHODS, MASKS, PATHS, LatentPlane, apply_attribute, attribute_vector, check_count,
                       check_index, code_prior_samples, inpaint, inpaint_refusal, inpainting_log_likelihood,
                       inpainting_mask, interleave, interpolate, interpolate_codes, manifold, mean_image,
                       most_active_dims, prior_samples, reconstruct, traverse)
from .likelihoods import Bernoulli
from .loading import load_prior, open_for_inference
from .models.code_prior import inpaint_codes
from .objectives import mean_and_stderr
from .plot import plot_runs
from .files import load_tensors, sha256
from .runs import PartialEval, Run, bounds_on_the_same_draws, check_not_kept, eval_key
from .train import train
from .train_prior import train_prior
from .viz import gif_from_pngs, grid_image, save_gif, save_grid, save_image, scatter_image

__all__ = ["train", "train_prior", "fetch", "dataset_info", "sample_to_png", "reconstruct_to_png", "make_gif", "eval_to_json",
           "interpolate_to_png", "traverse_to_png", "attribute_to_png", "inpaint_to_png", "latent_map_to_png",
           "plot_runs", "export_run"]


MAX_GRID_IMAGES = 2500     # images in one PNG grid: 50 x 50 cells, 6,008 pixels a side at the 4x enlargement
MAX_CHAINS = 1000          # inpainting chains per image: each is a decode per step
MAX_SAMPLER_STEPS = 10000
MAX_DECODE_BATCH = 1_000_000   # decodes at once by `vaekit eval`


def _positive(name: str, value: int, most: int | None = None) -> None:
    if value < 1:
        raise ConfigError(f"--{name} must be at least 1, got {value}")
    if most is not None and value > most:
        raise ConfigError(f"--{name} {value} is over vaekit's limit of {most}; ask for at most {most}")


def _finite(name: str, value: float) -> None:
    """Refuses a float flag's NaN or infinity (or a number beyond float32's, which the model computes
    in): it would decode to a grey picture labelled "nan"."""
    if not abs(value) <= (most := torch.finfo(torch.float32).max):
        raise ConfigError(f"--{name} must be a finite number (within +-{most:.1e}), got {value}")


def _grid_of(images: int, given: str, fewer: str) -> None:
    """Refuses a picture of more than MAX_GRID_IMAGES images (`given`: the flags that ask for them;
    `fewer`: how to ask for fewer, in the command's own flags)."""
    if images > MAX_GRID_IMAGES:
        raise ConfigError(f"{given} makes a grid of {images} images, over vaekit's limit of {MAX_GRID_IMAGES} in "
                          f"one picture; {fewer}")


def _check_out(out: str | Path | None, *beside: str) -> None:
    """Refuses an --out (and the files written beside it, `beside`: their suffixes, such as ".gif")
    that is one of the files a run keeps (runs.check_not_kept)."""
    if out is not None:
        check_not_kept(out, *(Path(out).with_suffix(suffix) for suffix in beside))


def _labels(config, split, rt):
    """A split's labels on the device for a class-conditional model; None for another."""
    return split.labels.to(rt.device) if config.model.conditional else None


def _ping_pong(frames: list) -> list:
    """frames 0..n-1 then back n-2..1, so a looping GIF runs smoothly forth and back."""
    return frames + frames[-2:0:-1]


def sample_to_png(run: str | Path, n: int = 100, seed: int = 0, out: str | Path | None = None,
                  device: str = "auto", label: int | None = None, precision: str = "auto") -> Path:
    """A grid of `n` images decoded from prior draws (of class `label`, for a class-conditional
    model); returns the PNG's path."""
    _positive("n", n)
    _grid_of(n, f"--n {n}", f"ask for --n {MAX_GRID_IMAGES} or fewer (several pictures: vary --seed)")
    _check_out(out)
    opened = open_for_inference(run, device, precision)
    model, config, rt = opened.model, opened.config, opened.runtime
    classes = config.model.num_classes
    if label is not None and not config.model.conditional:
        raise ConfigError(f"--label {label}: {run} is not a class-conditional model (train one with --conditional)")
    if label is not None and not 0 <= label < classes:
        raise ConfigError(f"--label {label} is not a class of {run}: its classes are 0..{classes - 1}")
    if label is None and config.model.conditional:
        raise ConfigError(f"{run} is a class-conditional model: pass --label 0..{classes - 1}")
    if config.model.family == "vq":
        images = code_prior_samples(model, load_prior(opened, required_by="sample"), n, rt.generator(seed))
    else:
        images = prior_samples(model, n, rt.generator(seed), label)
    name = f"prior_n{n}_seed{seed}" + ("" if label is None else f"_label{label}")
    return save_grid(images, out or opened.run.samples_path(f"{name}.png"))


def reconstruct_to_png(run: str | Path, n: int = 16, seed: int = 0, out: str | Path | None = None,
                       data_dir: str | Path | None = None, device: str = "auto", precision: str = "auto") -> Path:
    """The first `n` test images beside their decodes (z ~ q(z|x)); returns the PNG's path."""
    _positive("n", n)
    _grid_of(2 * n, f"--n {n} (each beside its decode)", f"ask for --n {MAX_GRID_IMAGES // 2} or fewer")
    _check_out(out)
    opened = open_for_inference(run, device, precision)
    model, config, rt, splits = opened.model, opened.config, opened.runtime, opened.data(data_dir)
    test = splits.test
    check_count("--n", n, len(test))
    labels = _labels(config, test, rt)
    gen = rt.generator(seed)
    x = preprocess(test.images[:n].to(rt.device), config.data.binarization, gen)   # gen goes on to draw z
    decoded = reconstruct(model, x, gen, None if labels is None else labels[:n])
    cols = 2 * min(4, n)   # pairs side by side, four pairs a row
    return save_grid(interleave(x, decoded), out or opened.run.samples_path(f"reconstruct_n{n}_seed{seed}.png"),
                     nrow=cols)


def make_gif(run: str | Path) -> Path:
    """RUN/training.gif from RUN/images/image_at_epoch_*.png, with the seed's frame choice."""
    r = Run.open(run)
    pngs = sorted(r.images.glob("image_at_epoch_*.png"))
    if not pngs:
        raise ConfigError(f"{run} has no epoch images ({r.images}/image_at_epoch_*.png), so there is no GIF to make "
                          "of it: train the run first (a model shipped with vaekit comes without them)")
    return gif_from_pngs(pngs, r.gif_path)


def eval_to_json(run: str | Path, k: int = 5000, binarization: str | None = None, seed: int = 0,
                 n: int | None = None, decode_batch: int | None = None, max_memory_mb: float | None = None,
                 data_dir: str | Path | None = None, device: str = "auto", precision: str = "auto",
                 compile: str | None = None, workers: int = 1, report=None, log=lambda line: None) -> dict:
    """`vaekit eval`: test ELBO (rate, distortion), IWAE bound with `k` draws, active units (and bits
    per dimension, for grey levels), each mean with its standard error, over the first `n` test
    images (default: all) binarised as `binarization` (default: as the run was trained), in
    `precision`. `decode_batch` decodes at once (default: the fastest measured on this device, within
    `max_memory_mb`; see models/inference.py). The record is also kept in RUN/eval.json, one entry
    per protocol (BINARIZATION_kK_nN_seedS_PRECISION; see Run.save_eval); returns it. `report(result)` is called
    before the file is written (the CLI prints its table), so a failed write loses nothing.
    A vq run reports its two-stage bound instead (evaluate.vq_eval_report), with K = 1 whatever
    `k` says: its posterior is one-hot, so importance sampling cannot tighten the bound.
    An evaluation of RESUMABLE_FROM decodes or more keeps its bounds as it goes (runs.PartialEval):
    run again after a stop, it goes on where it stopped. `compile`: auto, on or off (compiling.py;
    default: the run's setting). `workers`: processes that share the IWAE pass on a CPU, each with its
    share of the threads (eval_workers.py; `max_memory_mb` is each one's). `log(line)`: told what
    happens beside the result (a resume, a compile)."""
    _positive("k", k)
    _positive("workers", workers)
    for flag, value, most in (("n", n, None), ("decode-batch", decode_batch, MAX_DECODE_BATCH)):
        if value is not None:
            _positive(flag, value, most)
    if max_memory_mb is not None and not 0 < max_memory_mb < math.inf:
        raise ConfigError(f"--max-memory must be a positive, finite number of MB, got {max_memory_mb}")
    if binarization is not None and binarization not in BINARIZATIONS:
        raise ConfigError(f"--binarization must be one of {', '.join(BINARIZATIONS)}; got {binarization!r}")
    if compile is not None and compile not in COMPILE_MODES:
        raise ConfigError(f"--compile must be one of {', '.join(COMPILE_MODES)}; got {compile!r}")
    opened = open_for_inference(run, device, precision, compile=compile)
    model, config, rt, splits = opened.model, opened.config, opened.runtime, opened.data(data_dir)
    check_workers(workers, rt.device)
    opened.run.check_eval_writable()     # before the work (hours at K = 5000), not after it
    binarization = binarization or config.data.binarization
    mc = config.model
    if binarization == "none" and mc.likelihood == "bernoulli" and not mc.allow_continuous_bernoulli:
        raise ConfigError(f"{run} has a bernoulli likelihood, for binary data: pass --binarization static or dynamic")
    test = splits.test
    if n is not None:
        check_count("--n", n, len(test))
    n = n or len(test)
    weights = {"data": opened.data_fingerprint, "weights_sha256": sha256(opened.weights)}
    if mc.family == "vq":
        if workers > 1:
            raise ConfigError(f"{run} is a vq model, whose bound has no importance-sampling pass to share out: "
                              "leave --workers out")
        x = preprocess(test.images[:n].to(rt.device), binarization, rt.generator(seed))
        result = {**vq_eval_report(model, load_prior(opened), x, binarization, seed), **weights}
        if report:
            report(result)
        opened.run.save_eval(result)
        return result
    if k > (most := max_draws(model, rt.device, max_memory_mb)):
        fewer = f"ask for --k {most} or fewer, or raise --max-memory" if most else "raise --max-memory"
        raise ConfigError(f"--k {k}: one image's {k} draws would need {k * 4 * model.noise_dim / 2**20:,.1f} MB at "
                          f"once, over the memory cap: {fewer}")
    labels = _labels(config, test, rt)
    with threads(threads_per_worker(workers)):     # tuned for the threads each worker will have
        decode_batch = decode_batch or decode_batch_for(model, rt.device, n * (k + 1), max_memory_mb)
    gen = rt.generator(seed)
    x = preprocess(test.images[:n].to(rt.device), binarization, gen)    # gen goes on to draw the ELBO's z
    measured = {"binarization": binarization, "k": k, "n": n, "seed": seed,
                "precision": model.inference_precision or rt.precision}
    weigh = log_weights(model, config.train.compile, rt.device, log, n * (k + 1))
    with contextlib.ExitStack() as stack:     # on a stop, the bounds are kept first, then the workers end
        pool = None if workers == 1 else stack.enter_context(EvalWorkers(
            workers, config.model, load_tensors(opened.weights), rt.device, measured["precision"],
            config.train.compile, n * (k + 1), log))
        partial = None
        if n * (k + 1) >= RESUMABLE_FROM:   # the draws (the device's generator) and the pass's form must match too
            identity = {**measured, **weights, "device": rt.device.type, "compiled": weigh is not None}
            partial = stack.enter_context(PartialEval(opened.run, eval_key(measured), identity, log))
            if said := partial.resume():
                log(said)
        result = likelihood_report(model, x, binarization, rt, gen, k, decode_batch, seed,
                                   None if labels is None else labels[:n], weigh, partial, pool)
    result.update(weights)        # scored: a stop from here on leaves the saved bounds, and SIGTERM its default
    if workers > 1:
        result["workers"] = workers
    if partial is not None:
        result.update(paired_differences(partial.bounds, bounds_on_the_same_draws(opened.run, identity)))
    if report:
        report(result)
    opened.run.save_eval(result)
    if partial is not None:
        partial.done()
    return result


def interpolate_to_png(run: str | Path, index: tuple[int, int] = (0, 1), steps: int = 10, gif: bool = False,
                       seed: int = 0, out: str | Path | None = None, data_dir: str | Path | None = None,
                       device: str = "auto", precision: str = "auto") -> list[Path]:
    """Two rows, the linear and the spherical path between test images index[0] and index[1], each
    framed by the two binary originals; with `gif`, an animation of both paths beside the PNG. A vq
    model has one path, linear in its continuous encoder output z_e, each point quantised to codes
    and decoded (piecewise constant: the codes jump), so labelled."""
    _positive("steps", steps)
    _grid_of(2 * (steps + 2), f"--steps {steps} (two paths, framed by their ends)",
             f"ask for --steps {MAX_GRID_IMAGES // 2 - 2} or fewer")
    _check_out(out, *([".gif"] if gif else []))
    opened = open_for_inference(run, device, precision, unconditional_task="interpolate")
    model, config, rt, splits = opened.model, opened.config, opened.runtime, opened.data(data_dir)
    for i in index:
        check_index("--index", i, len(splits.test))
    ends = preprocess(splits.test.images[list(index)].to(rt.device), config.data.binarization, rt.generator(seed))
    if config.model.family == "vq":   # one path: linear in the encoder's output z_e, quantised at each point
        names, paths = ["linear in z_e, quantised"], [interpolate_codes(model, ends, steps)]
    else:
        names, paths = list(PATHS), [interpolate(model, ends, steps, p) for p in PATHS]
    rows = torch.cat([torch.cat([ends[:1], path, ends[1:]]) for path in paths])
    png = save_grid(rows, out or opened.run.samples_path(f"interpolate_{index[0]}_{index[1]}.png"), nrow=steps + 2,
                    row_labels=names, col_labels=[f"test {index[0]}", *(f"t={t:.2g}" for t in
                                                        torch.linspace(0, 1, steps).tolist()), f"test {index[1]}"])
    if not gif:
        return [png]
    frames = [grid_image(torch.stack([p[t] for p in paths]), nrow=len(paths)) for t in range(steps)]
    return [png, save_gif(_ping_pong(frames), png.with_suffix(".gif"))]


def traverse_to_png(run: str | Path, index: int = 0, dims: int = 8, steps: int = 9, seed: int = 0,
                    out: str | Path | None = None, data_dir: str | Path | None = None,
                    device: str = "auto", precision: str = "auto") -> list[Path]:
    """One row per latent dimension, the `dims` with the most KL over the test set first: test image
    `index` decoded with that dimension set to -3..3 (`steps` values). A PNG, each row labelled
    with its dimension and rate (its KL in nats), and a GIF."""
    _positive("dims", dims)
    _positive("steps", steps)
    _grid_of(dims * steps, f"--dims {dims} x --steps {steps}", "ask for fewer --dims or --steps")
    _check_out(out, ".gif")
    opened = open_for_inference(run, device, precision, unconditional_task="traverse", continuous_task="traverse")
    model, config, rt, splits = opened.model, opened.config, opened.runtime, opened.data(data_dir)
    check_index("--index", index, len(splits.test))
    if dims > model.latent_dim:
        raise ConfigError(f"--dims {dims} is more than the model's {model.latent_dim} latent dimensions")
    x = preprocess(splits.test.images.to(rt.device), config.data.binarization, rt.generator(seed))
    ranked, rates = most_active_dims(model, x, dims)
    values = torch.linspace(-3, 3, steps)
    _, images = traverse(model, x[index:index + 1], ranked, values)
    png = save_grid(images.flatten(0, 1), out or opened.run.samples_path(f"traverse_{index}.png"), nrow=steps,
                    row_labels=[f"z{d}: {r:.2f} nats" for d, r in zip(ranked, rates)],
                    col_labels=[f"{v:+.2g}" for v in values.tolist()])
    frames = [grid_image(images[:, s], nrow=dims) for s in range(steps)]
    return [png, save_gif(_ping_pong(frames), png.with_suffix(".gif"))]


def attribute_to_png(run: str | Path, to: int, from_: int | None = None, n: int = 8, strength: float = 2.0,
                     steps: int = 7, seed: int = 0, out: str | Path | None = None,
                     data_dir: str | Path | None = None, device: str = "auto", precision: str = "auto") -> Path:
    """Morphs the first `n` test images labelled `from_` (or, without it, not labelled `to`) toward
    `to`: their posterior means plus s times the attribute vector (class means over the training
    set), s = 0..strength in `steps`. One row per image: the binary original, then the sweep."""
    _positive("n", n)
    _positive("steps", steps)
    _finite("strength", strength)
    _grid_of(n * (steps + 1), f"--n {n} x (--steps {steps} + the original)", "ask for fewer --n or --steps")
    _check_out(out)
    opened = open_for_inference(run, device, precision, unconditional_task="attribute", continuous_task="attribute")
    model, config, rt, splits = opened.model, opened.config, opened.runtime, opened.data(data_dir)
    labels = set(splits.train.labels.tolist())
    for flag, label in (("--to", to), ("--from", from_)):
        if label is not None and label not in labels:
            raise ConfigError(f"{flag} {label} is not a label of {config.data.dataset}; "
                              f"its labels are {', '.join(map(str, sorted(labels)))}")
    if from_ == to:
        raise ConfigError(f"--from and --to are both {to}; give two different labels")
    gen = rt.generator(seed)
    b = config.data.binarization
    train_codes = model.posterior(preprocess(splits.train.images.to(rt.device), b, gen))[0]
    vector = attribute_vector(train_codes, splits.train.labels.to(rt.device), to, from_)
    chosen = splits.test.labels == from_ if from_ is not None else splits.test.labels != to
    check_count("--n", n, int(chosen.sum()), f"test images labelled {from_}" if from_ is not None
                else f"test images not labelled {to}")
    x = preprocess(splits.test.images[chosen][:n].to(rt.device), b, gen)
    morphs = apply_attribute(model, model.posterior(x)[0], vector, torch.linspace(0, strength, steps))
    grid = torch.cat([x[:, None], morphs], dim=1).flatten(0, 1)
    name = f"attribute_{'not' if from_ is None else from_}_to_{to}.png"
    return save_grid(grid, out or opened.run.samples_path(name), nrow=steps + 1,
                     col_labels=["original", *(f"{s:+.2g} v" for s in torch.linspace(0, strength, steps).tolist())])


def _mask(spec: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """--mask: a region's name (generate.MASKS) or the path of a PNG of the images' size, white =
    missing -> bool [C,H,W] (generate.inpainting_mask)."""
    if spec in MASKS:
        return inpainting_mask(spec, shape, "--mask")
    try:
        with Image.open(spec) as img:
            img.load()
    except (OSError, UnidentifiedImageError):
        raise ConfigError(f"--mask {spec!r} is neither one of {', '.join(MASKS)} nor a readable PNG file") from None
    return inpainting_mask(img, shape, f"--mask {spec}")


def inpaint_to_png(run: str | Path, mask: str = "centre", n: int = 8, steps: int = 50, chains: int = 4,
                   method: str = "pseudo-gibbs", score_n: int | None = 1000, seed: int = 0,
                   out: str | Path | None = None, data_dir: str | Path | None = None,
                   device: str = "auto", precision: str = "auto") -> tuple[Path, dict]:
    """Fills the `mask` region of the first `n` test images (rows: binary original, the input with
    the missing pixels grey, the completion) and scores the first `score_n` test images (None: all;
    the standard errors say how far the full score can be from a quick one) against the training
    set's mean image (see generate.inpainting_log_likelihood)."""
    for flag, value, most in (("n", n, None), ("steps", steps, MAX_SAMPLER_STEPS), ("chains", chains, MAX_CHAINS)):
        _positive(flag, value, most)
    _grid_of(3 * n, f"--n {n} (three rows)", f"ask for --n {MAX_GRID_IMAGES // 3} or fewer")
    _check_out(out)
    if score_n is not None:
        _positive("score-n", score_n)
    if method not in INPAINT_METHODS:
        raise ConfigError(f"--method must be one of {', '.join(INPAINT_METHODS)}; got {method!r}")
    opened = open_for_inference(run, device, precision, unconditional_task="inpaint")
    model, config, rt, splits = opened.model, opened.config, opened.runtime, opened.data(data_dir)
    check_count("--n", n, len(splits.test))
    if config.model.family == "vq":
        return _inpaint_vq(opened, mask, n, chains, score_n, seed, out, splits)
    refusal = inpaint_refusal(config.model, method)
    if refusal:
        raise ConfigError(f"{run}: {refusal}")
    if config.model.likelihood != "bernoulli":
        raise ConfigError(f"`vaekit inpaint` samples binary pixels: it is for bernoulli models, and {run} is a "
                          f"{config.model.likelihood} model")
    m = _mask(mask, tuple(splits.test.images.shape[1:])).to(rt.device)
    b, gen = config.data.binarization, rt.generator(seed)
    start = mean_image(preprocess(splits.train.images.to(rt.device), b, gen))
    test = preprocess(splits.test.images.to(rt.device), b, gen)
    x = test[:n]
    filled, _ = inpaint(model, x, m, steps, chains, method, start, gen)
    rows = torch.cat([x, torch.where(m, 0.5, x), filled])
    name = f"inpaint_{Path(mask).stem if mask not in MASKS else mask}_{method}.png"
    png = save_grid(rows, out or opened.run.samples_path(name), nrow=len(x),
                    row_labels=["original", "input", "filled"])
    # the score's chains draw from a generator of their own, so the picture's --n does not change it
    scores = inpainting_log_likelihood(model, test[:score_n], m, start, rt.generator(seed), steps, chains, method)
    return png, {"protocol": protocol(b, seed), **scores}


def _inpaint_vq(opened, mask: str, n: int, proposals: int, score_n: int | None, seed: int, out, splits
                ) -> tuple[Path, dict]:
    """inpaint_to_png for a vq run: the codes whose receptive field holds a missing pixel are drawn
    by importance resampling of `proposals` prior draws against the observed pixels
    (models/code_prior.inpaint_codes), the others kept; the observed pixels are pasted back. The
    score: log p of the true missing pixels under the decode of the codes drawn, against the
    training set's mean image, nats per image."""
    model, config, rt = opened.model, opened.config, opened.runtime
    if config.model.likelihood != "bernoulli":
        raise ConfigError(f"`vaekit inpaint` scores binary pixels: it is for bernoulli models, and {opened.run.name.text} "
                          f"is a {config.model.likelihood} model")
    prior = load_prior(opened, required_by="inpaint")
    m = _mask(mask, tuple(splits.test.images.shape[1:])).to(rt.device)                 # [C,H,W] True = missing
    b, gen = config.data.binarization, rt.generator(seed)
    start = mean_image(preprocess(splits.train.images.to(rt.device), b, gen))
    test = preprocess(splits.test.images.to(rt.device), b, gen)

    def fill(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:     # the decode's logits [B,C,H,W]
        codes = inpaint_codes(model, prior, x, ~m.expand_as(x), generator, proposals)
        return model.decode_indices(codes)

    x = test[:n]
    filled = torch.where(m, model.likelihood.mean(fill(x, gen)), x)
    rows = torch.cat([x, torch.where(m, 0.5, x), filled])
    name = f"inpaint_{Path(mask).stem if mask not in MASKS else mask}_vq.png"
    png = save_grid(rows, out or opened.run.samples_path(name), nrow=len(x), row_labels=["original", "input", "filled"])
    scored, score_gen = test[:score_n], rt.generator(seed)
    baseline_logits = torch.logit(start)
    values = torch.cat([torch.stack([Bernoulli.log_prob(xb, fill(xb, score_gen), m),
                                     Bernoulli.log_prob(xb, baseline_logits.expand_as(xb), m)], 1).double()
                        for xb in scored.split(100)])                                  # [N,2]
    values = torch.cat([values, values[:, :1] - values[:, 1:]], dim=1)
    scores = {}
    for i, key in enumerate(("inpainting", "mean_image_baseline", "gain")):
        scores[key], scores[f"{key}_stderr"] = mean_and_stderr(values[:, i])
    return png, {"protocol": protocol(b, seed), "method": f"vq: the codes of {proposals} prior proposals, "
                 "importance-resampled", "n": len(scored), "masked_pixels": int(m.sum()), **scores}


def latent_map_to_png(run: str | Path, n: int = 20, seed: int = 0, out: str | Path | None = None,
                      data_dir: str | Path | None = None, device: str = "auto", precision: str = "auto") -> list[Path]:
    """The test set's posterior means as a scatter coloured by label (a PCA projection beyond two
    dimensions); for a 2-D latent also the decoded manifold, n x n, beside it (`*_manifold.png`)."""
    _positive("n", n)
    _check_out(out)
    opened = open_for_inference(run, device, precision, unconditional_task="latent", continuous_task="latent")
    model, config, rt, splits = opened.model, opened.config, opened.runtime, opened.data(data_dir)
    if model.latent_dim == 2:
        _grid_of(n * n, f"--n {n} (an n x n manifold)", f"ask for --n {math.isqrt(MAX_GRID_IMAGES)} or fewer")
    x = preprocess(splits.test.images.to(rt.device), config.data.binarization, rt.generator(seed))
    codes = model.posterior(x)[0]                                            # [N,D]
    plane = LatentPlane.of(codes)
    png = save_image(scatter_image(plane.project(codes), splits.test.labels, plane.names),
                      Path(out or opened.run.samples_path("latent_scatter.png")))
    if model.latent_dim != 2:
        return [png]
    return [png, save_grid(manifold(model, n), png.with_name(png.stem + "_manifold.png"), nrow=n, scale=2)]
