"""Evaluation: exact sums over the whole test set (no dropped or padded tail), then one division.

Every number is stated with its binarization protocol: the seed's static threshold, or one
seeded Bernoulli draw of the test set ("dynamic"), so that numbers are reproducible; or the grey
levels themselves ("none"), where bits per dimension on the 8-bit scale are reported too.

The functions take the test images preprocessed once by their caller (x [N,C,H,W], see
`vaekit.data.preprocess`); the ELBO's z come from the generator that binarised them, its draws
going on, so one seed fixes every draw. A class-conditional model scores log p(x|y) and needs
the images' labels.

Precision, one rule: a model is run in the precision it carries, never wrapped in autocast twice.
A model prepared for inference (models.inference.prepare_for_inference, what vaekit.loading
opens) carries its runtime's precision and is run as it is. A model as training builds it carries
none: the functions that take a runtime (elbo_report, likelihood_report) run it under
`runtime.autocast()`, as training does; those that take none (elbo_per_image, iwae_bounds) run it
as they get it, so the training model in fp32 unless their caller holds an autocast."""
from __future__ import annotations

import contextlib
import functools
import time

import torch
from tqdm import tqdm

from .distributed import Runtime
from .likelihoods import bits_per_dim
from .models.code_prior import vq_log_likelihood
from .models.hierarchy import HierarchicalVAE
from .objectives import iwae_bound, mean_and_stderr, rate_per_dim

ACTIVE_UNIT_THRESHOLD = 0.01   # Burda et al. 2016: a unit is active when Cov_x(E_q[z_u]) > 0.01


def protocol(binarization: str, seed: int) -> str:
    """The binarization protocol in words, printed and saved beside every number."""
    if binarization == "static":
        return "static: threshold pixel >= 128, as the seed"
    if binarization == "none":
        return "none: grey levels pixel / 255"
    return f"dynamic: one Bernoulli draw of the test set from seed {seed}"


def reports_bits(model, binarization: str) -> bool:
    """Bits per dimension are reported for grey-level data under a likelihood of it."""
    return binarization == "none" and model.likelihood.nats_to_8bit_per_dim is not None


def _bits_per_dim(model, nll: float) -> float:
    c = model.config
    return bits_per_dim(nll, c.image_channels * c.image_size * c.image_size, model.likelihood)


def _runtime_precision(model, runtime: Runtime):
    """The context that runs `model` in the runtime's precision (the module docstring's rule):
    none for a prepared model, which carries it, else the runtime's autocast."""
    return contextlib.nullcontext() if model.inference_precision else runtime.autocast()


@torch.inference_mode()
def elbo_per_image(model, x: torch.Tensor, generator: torch.Generator, batch_size: int = 2000,
                   labels: torch.Tensor | None = None, progress=None) -> torch.Tensor:
    """The seed's single-sample ELBO, the distortion -log p(x|z) of the same z and the rate of each
    stochastic layer (closed-form where there is one) of each preprocessed image of x [N,C,H,W]
    -> [N,2+L] float64, nats; z drawn from `generator` a batch at a time. `progress`: a bar
    advanced by each batch's decodes."""
    parts = []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        y = None if labels is None else labels[start:start + batch_size]
        eps = torch.randn(len(xb), model.noise_dim, generator=generator, device=xb.device)
        terms = model(xb, eps=eps, y=y)
        parts.append(torch.cat([terms.log_w[:, None], -terms.log_px[:, None], terms.rate], dim=1).double())
        if progress is not None:
            progress.update(len(xb))
    return torch.cat(parts)


def _elbo_record(terms: torch.Tensor) -> dict:
    """The means of elbo_per_image's columns (and the analytic-KL ELBO) with their standard errors;
    for more than one stochastic layer, each layer's rate too (top first)."""
    record = {}
    rate = terms[:, 2:].sum(1)
    for name, values in (("elbo", terms[:, 0]), ("distortion", terms[:, 1]), ("rate", rate),
                         ("elbo_analytic_kl", -(terms[:, 1] + rate))):
        record[name], record[f"{name}_stderr"] = mean_and_stderr(values)
    if terms.shape[1] > 3:
        record["rate_per_layer"] = [round(r, 3) for r in terms[:, 2:].mean(0).tolist()]
    return record


@torch.inference_mode()
def elbo_report(model, x: torch.Tensor, binarization: str, runtime: Runtime, generator: torch.Generator,
                  batch_size: int = 2000, labels: torch.Tensor | None = None) -> dict:
    """Test ELBO in nats per image over all of x ([N,C,H,W] on runtime.device, preprocessed as
    `binarization` says), z drawn from `generator` (the one that binarised x).

    `elbo` is the seed's single-sample estimator (what it prints every epoch); `distortion`
    (-log p(x|z)) and `rate` (analytic KL) are the same pass's parts, and `elbo_analytic_kl`
    = -(distortion + rate), a lower-variance estimate of the same bound; each with its standard
    error over images. Always the ELBO (beta 1), whatever the training objective; with grey
    levels ("none") also `bits_per_dim`, of -elbo on the 8-bit scale. A training model is run under
    the runtime's autocast, a prepared one as it is (see the module docstring)."""
    was_training = model.training
    model.eval()
    with _runtime_precision(model, runtime):
        terms = elbo_per_image(model, x, generator, batch_size, labels)
    model.train(was_training)
    result = {**_elbo_record(terms), "n": len(x)}
    if reports_bits(model, binarization):
        result["bits_per_dim"] = _bits_per_dim(model, -result["elbo"])
    return result


IMAGE_STREAMS = 2 ** 32   # image i's importance draws: the generator seeded with (seed * IMAGE_STREAMS + i) mod 2**64


def _image_noise(seed: int, first: int, count: int, k: int, dim: int, device: torch.device) -> torch.Tensor:
    """The K standard-normal draws of images first..first+count-1: [K, count, dim]. Each image's
    draws come from a generator of its own, so an image's bound never depends on batch sizes, on
    how many images are scored, on the device's batch order or on the precision. The seed is taken
    mod 2**64, the generator's range: any seed works (training's held-out ones grow with the epoch)."""
    draws = [torch.randn(k, dim, device=device,
                         generator=torch.Generator(device).manual_seed((seed * IMAGE_STREAMS + first + i) % 2**64))
             for i in range(count)]
    return torch.stack(draws, dim=1)


class LogWeights(torch.nn.Module):
    """The log importance weights of a pass of `model`, log p(x,z) - log q(z|x), as its forward
    computes them: (x [B,C,H,W], eps [kc,B,noise_dim], y) -> [kc,B]. What iwae_bounds calls; a
    module, so that torch.compile can take the whole pass (compiling.log_weights) and drop what
    the bound does not read."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, eps: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.model(x, eps=eps, y=y).log_w


def images_per_pass(decode_batch: int, k: int) -> int:
    """How many images' K draws one pass of at most `decode_batch` decodes scores (at least one)."""
    return max(1, decode_batch // k)


@torch.inference_mode()
def iwae_bounds(model, x: torch.Tensor, k: int, seed: int = 0, decode_batch: int = 2000,
                labels: torch.Tensor | None = None, progress=None, first: int = 0, log_weights=None,
                on_pass=None) -> torch.Tensor:
    """The IWAE bound log (1/K) sum_k p(x,z_k)/q(z_k|x), z_k ~ q(z|x), for each preprocessed image
    of x [N,C,H,W] (and label) -> [N] (nats; -bound is an upper bound on the NLL that tightens as K grows).

    At most `decode_batch` decodes at once: max(1, decode_batch // K) images a pass, their K draws
    in equal chunks, the log weights [K,B] joined and reduced with one logsumexp. x's images are
    test images first, first + 1, ...: image i's draws are fixed by `seed` and i alone (see
    _image_noise), so the bounds of x[m:] with first=m are those of x's last images. `log_weights`:
    what computes a pass's log weights (default: LogWeights(model), eager). `progress`: a bar advanced
    per decode; `on_pass(bounds)`: told each pass's bounds [B] as they are scored."""
    log_weights = log_weights or LogWeights(model)
    per_pass = images_per_pass(decode_batch, k)
    chunks = -(-k // decode_batch)                                  # draws split in this many chunks
    chunk = -(-k // chunks)                                         # draws per decode, per image
    bounds = []
    for start in range(0, len(x), per_pass):
        xb = x[start:start + per_pass]
        yb = None if labels is None else labels[start:start + per_pass]
        eps = _image_noise(seed, first + start, len(xb), k, model.noise_dim, x.device)   # [K,B,noise_dim]
        log_w = []
        for done in range(0, k, chunk):
            draws = eps[done:done + chunk]                                         # [kc,B,noise_dim]
            log_w.append(log_weights(xb, draws, yb))                              # [kc,B]
            if progress is not None:
                progress.update(len(draws) * len(xb))
        bounds.append(iwae_bound(torch.cat(log_w)))
        if on_pass is not None:
            on_pass(bounds[-1])
    return torch.cat(bounds) if bounds else x.new_zeros(0)


@torch.inference_mode()
def likelihood_report(model, x: torch.Tensor, binarization: str, runtime: Runtime, generator: torch.Generator,
             k: int = 5000, decode_batch: int = 2000, seed: int = 0, labels: torch.Tensor | None = None,
             log_weights=None, partial=None, workers=None) -> dict:
    """Everything `vaekit eval` reports, in nats per image over all of x ([N,C,H,W], preprocessed
    as `binarization` says with `generator`, seeded by `seed`; the ELBO's z come from it after):
    the ELBO (single-sample and analytic-KL, with rate and distortion apart), the IWAE bound
    with K draws and the NLL it bounds, each mean with its standard error over images; active
    units and the rate of each latent dimension; for grey levels also both in bits per dimension;
    and what it cost (seconds, decodes per second, precision, decode batch). `labels` [N]: for a
    conditional model. Every pass scores those same x; image i's importance draws come from
    `seed` + 1 and i alone (see iwae_bounds), computed by `log_weights` (default: the model's
    forward). `partial` (runs.PartialEval, resumed): the bounds of the first images, scored in
    earlier sittings, which it is told the new ones to keep. `workers` (eval_workers.EvalWorkers):
    processes of the same model that score the IWAE pass instead of this one. Meant for a prepared
    model; a training model is run under the runtime's autocast (see the module docstring)."""
    start = time.perf_counter()
    n = len(x)
    before = partial.bounds if partial is not None else torch.zeros(0, dtype=torch.float64)
    m = len(before)                                                  # images scored in earlier sittings
    with _runtime_precision(model, runtime), tqdm(total=n * (k + 1), initial=m * k, desc=f"eval K={k}", unit="decode",
                                  unit_scale=True, disable=None, smoothing=0.05) as bar:
        elbo = _elbo_record(elbo_per_image(model, x, generator, decode_batch, labels, bar))
        mean, logvar = model.posterior(x, decode_batch, labels)     # [N,D] each
        layers = active_units_per_layer(model, x, decode_batch) if isinstance(model, HierarchicalVAE) else {}
        score = workers.iwae_bounds if workers is not None else functools.partial(iwae_bounds, model,
                                                                                    log_weights=log_weights)
        fresh = score(x[m:], k, seed + 1, decode_batch, None if labels is None else labels[m:], bar,
                      first=m, on_pass=None if partial is None else partial.add)
    bounds = torch.cat([before.to(fresh), fresh])
    seconds = partial.seconds if partial is not None else time.perf_counter() - start
    bound, bound_stderr = mean_and_stderr(bounds)
    bits = {}
    if reports_bits(model, binarization):
        bits = {"bits_per_dim": _bits_per_dim(model, -elbo["elbo"]), "nll_bits_per_dim": _bits_per_dim(model, -bound)}
    unit_variance = mean.double().var(dim=0)                         # diagonal of Cov_x(E_q[z]), [D]
    return {
        "protocol": protocol(binarization, seed), "binarization": binarization, "seed": seed, "n": n,
        "likelihood": model.config.likelihood, **elbo, "k": k, "iwae_bound": bound, "nll_upper_bound": -bound,
        "iwae_bound_stderr": bound_stderr, **bits,
        "active_units": int((unit_variance > ACTIVE_UNIT_THRESHOLD).sum()), "latent_dim": mean.shape[1], **layers,
        # KL to N(0, 1) of each dimension: the rate of each, under the standard prior of a one-layer model
        **({"rate_per_dim": [round(r, 4) for r in rate_per_dim(mean, logvar).tolist()]}
           if model.config.prior == "standard" and model.config.layers_of_z == 1 else {}),
        "precision": model.inference_precision or runtime.precision, "decode_batch": decode_batch,
        "decodes": n * (k + 1), "seconds": round(seconds, 1), "decodes_per_second": round(n * (k + 1) / seconds),
        **({"sittings": partial.sittings} if partial is not None and partial.sittings > 1 else {}),
    }


def paired_differences(bounds: torch.Tensor, others: dict[str, torch.Tensor]) -> dict:
    """`bounds` [N] minus each of `others` ({eval key: bounds [M]}) image by image, over the
    images both scored (the first min(N, M)): {"same_draws": {key: {images, difference,
    difference_stderr}}} in nats, or {} without others. On the same images and draws the
    difference is the precision's alone, and its standard error a small fraction of either bound's."""
    if not others:
        return {}
    pairs = {}
    for key, other in others.items():
        n = min(len(bounds), len(other))
        difference, stderr = mean_and_stderr(bounds[:n] - other[:n].to(bounds))
        pairs[key] = {"images": n, "difference": difference, "difference_stderr": stderr}
    return {"same_draws": pairs}


def active_units_per_layer(model, x: torch.Tensor, batch_size: int) -> dict:
    """For a hierarchy, each layer's active units (top first): its units whose posterior mean
    varies over the images x (Cov > ACTIVE_UNIT_THRESHOLD), each lower layer's mean taken given
    the layers above at theirs (HierarchicalVAE.layer_means); and each layer's unit count."""
    parts = [model.layer_means(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    variances = [torch.cat(layer).double().var(dim=0) for layer in zip(*parts)]     # [units] per layer
    return {"active_units_per_layer": [int((v > ACTIVE_UNIT_THRESHOLD).sum()) for v in variances],
            "units_per_layer": [len(v) for v in variances]}


# -- how many decodes at once ----------------------------------------------------------------------
DEFAULT_MAX_MEMORY_MB = 1024            # on CPU; on a GPU, half its free memory
# decode batches tried: 256 .. 65536. Smaller ones decode faster alone on a CPU (their activations stay in
# the cache) but lose it again in the evaluation's per-call work: K = 5000 at 32 ran 16,600 decodes/s.
TUNED_SIZES = tuple(2 ** i for i in range(8, 17))
TIMED_DECODES = 4096                    # decodes each size is timed over, at least (one call of the largest)
TUNING_PAYS = 1_000_000                 # decodes from which tuning (seconds) is worth its cost
UNTUNED_DECODE_BATCH = 1024
RESUMABLE_FROM = 1_000_000              # decodes from which `vaekit eval` keeps its bounds as it goes (runs.PartialEval)


def _decode_random(model, n: int, device: torch.device) -> torch.Tensor:
    """Decodes n random codes (of class 0, for a conditional model): what sizing measures."""
    y = torch.zeros(n, dtype=torch.long, device=device) if model.config.conditional else None
    return model.decode(torch.randn(n, model.latent_dim, device=device), y)


def bytes_per_decode(model, device: torch.device) -> int:
    """The memory one decode needs at most, by a documented rule: twice the bytes of the outputs of
    all the decoder's layers for one code (a layer's input and output live together, and the
    likelihood's terms need about one more output's worth). The seed's model: about 340 KB."""
    sizes = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel() * out.element_size()))
             for m in model.decoder.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            _decode_random(model, 1, device)
    finally:
        for h in hooks:
            h.remove()
    return 2 * sum(sizes)


def memory_budget(device: torch.device, max_memory_mb: float | None = None) -> float:
    """The bytes an evaluation's passes may use: `max_memory_mb`, else DEFAULT_MAX_MEMORY_MB on CPU
    and half the GPU's free memory on CUDA."""
    if max_memory_mb is None:
        return torch.cuda.mem_get_info(device)[0] / 2 if device.type == "cuda" else DEFAULT_MAX_MEMORY_MB * 2 ** 20
    return max_memory_mb * 2 ** 20


def max_decodes(model, device: torch.device, max_memory_mb: float | None = None) -> int:
    """The most decodes at once within the memory budget."""
    return max(1, int(memory_budget(device, max_memory_mb) // bytes_per_decode(model, device)))


def max_draws(model, device: torch.device, max_memory_mb: float | None = None) -> int:
    """The most importance draws of one image within the memory budget: a pass holds all K of
    an image's noise vectors (float32) at once (_image_noise)."""
    return int(memory_budget(device, max_memory_mb) // (4 * model.noise_dim))


def _decodes_per_second(model, size: int, calls: int, device: torch.device) -> float:
    """Decodes per second of `calls` decodes of `size` random codes, timed."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        _decode_random(model, size, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return calls * size / (time.perf_counter() - start)


@torch.inference_mode()
def fastest_decode_batch(model, device: torch.device, cap: int) -> int:
    """The decode batch with the most decodes per second on this device and precision, measured:
    sizes doubling from 256 up to `cap`, each timed twice over TIMED_DECODES decodes (at least one
    call) after one call that warms up, its faster timing kept, stopping once a size is 10% slower
    than the best so far. Timed once, a size could lose to noise: in one A/B run of the seed's
    model the search stopped at 256 (a pass of 17,540 decodes/s) where the other round's 2,048
    gave 21,048."""
    best, best_rate = min(cap, TUNED_SIZES[0]), 0.0
    for size in [s for s in TUNED_SIZES if s < cap] + [cap]:
        calls = max(1, TIMED_DECODES // size)
        _decode_random(model, size, device)
        rate = max(_decodes_per_second(model, size, calls, device) for _ in range(2))
        if rate > best_rate:
            best, best_rate = size, rate
        elif rate < 0.9 * best_rate:
            break
    return best


def decode_batch_for(model, device: torch.device, decodes: int, max_memory_mb: float | None = None) -> int:
    """How many decodes to run at once for a job of `decodes`: measured (fastest_decode_batch)
    when the job is long enough for the measurement to pay, within the memory cap (max_decodes)."""
    cap = max_decodes(model, device, max_memory_mb)
    return fastest_decode_batch(model, device, cap) if decodes >= TUNING_PAYS else min(cap, UNTUNED_DECODE_BATCH)


def eval_table(result: dict) -> str:
    """The record of `likelihood_report` as a table for the terminal: each mean with its standard error over
    the images scored, the protocol beside each number."""
    if result.get("family") == "vq":
        return vq_eval_table(result)
    b, k = result["binarization"], result["k"]

    def nats(name: str, sign: float = 1.0) -> tuple[str, str]:
        stderr = result.get(f"{name}_stderr")
        return f"{sign * result[name]:.2f}", "" if stderr is None else f"± {stderr:.2f}"

    rows = [
        ("test ELBO, single-sample (the seed's)", *nats("elbo")),
        ("test ELBO, analytic KL", *nats("elbo_analytic_kl")),
        ("  distortion  -log p(x|z)", *nats("distortion")),
        ("  rate  KL(q(z|x) || p(z))", *nats("rate")),
        (f"IWAE bound, K={k}", *nats("iwae_bound")),
        (f"NLL <= -IWAE bound, K={k}", *nats("iwae_bound", -1.0)),
        (f"active units (Cov > {ACTIVE_UNIT_THRESHOLD})", f"{result['active_units']}/{result['latent_dim']}", ""),
    ]
    if "rate_per_layer" in result:          # a hierarchy: each layer's rate and active units, top first
        rows[4:4] = [(f"    layer {i + 1}", f"{rate:.2f}", "") for i, rate in enumerate(result["rate_per_layer"])]
    if "bits_per_dim" in result:
        rows[1:1] = [("  = bits/dim, 8-bit scale (its -ELBO)", f"{result['bits_per_dim']:.4f}", "")]
        rows[-1:-1] = [(f"  = bits/dim, 8-bit scale (NLL, K={k})", f"{result['nll_bits_per_dim']:.4f}", "")]
    if "active_units_per_layer" in result:
        rows.append(("  per layer, top first", " ".join(f"{a}/{u}" for a, u in
                                                      zip(result["active_units_per_layer"], result["units_per_layer"])), ""))
    nll = next(i for i, row in enumerate(rows) if row[0].startswith("NLL"))
    rows[nll:nll] = [(f"  minus {key}'s (first {pair['images']:,})", f"{pair['difference']:+.3f}",   # same draws
                      "" if pair["difference_stderr"] is None else f"± {pair['difference_stderr']:.3f}")
                     for key, pair in result.get("same_draws", {}).items()]
    processes = f", {result['workers']} processes" if "workers" in result else ""
    lines = [f"{result['n']} test images, binarization {result['protocol']}; {result['seconds']} s, "
             f"{result['decodes_per_second']:,} decodes/s ({result['precision']}, {result['decode_batch']} at once"
             f"{processes})",
             f"{'':40}{'nats/image':>12}  {'std. error':<10}  binarization"]
    lines += [f"{name:40}{value:>12}  {stderr:<10}  {b}" for name, value, stderr in rows]
    return "\n".join(lines)


@torch.inference_mode()
def vq_terms(model, x: torch.Tensor, batch_size: int, prior=None) -> torch.Tensor:
    """A vq model's two-stage bound and its distortion of each preprocessed image of x [N,C,H,W]
    -> [N,2] float64 nats: log p(x|c(x)) + log p(c(x)) (models/code_prior.vq_log_likelihood, under
    `prior` or, before one exists, the first stage's uniform prior over codes), -log p(x|c(x))."""
    bound = vq_log_likelihood(model, prior, x, batch_size)                                       # [N]
    distortion = torch.cat([model(x[i:i + batch_size]).distortion.double() for i in range(0, len(x), batch_size)])
    return torch.stack([bound, distortion], dim=1)


def vq_report(model, x: torch.Tensor, binarization: str, batch_size: int, prior=None) -> dict:
    """A vq model's numbers on preprocessed images x [M,C,H,W] (see vq_terms), means in nats per
    image: "elbo" the two-stage bound, "distortion" -log p(x|c(x)), "rate" -log p(c(x)) (and
    bits per dimension for grey levels)."""
    bound, distortion = vq_terms(model, x, batch_size, prior).mean(0).tolist()
    record = {"elbo": bound, "distortion": distortion, "rate": -bound - distortion}
    if reports_bits(model, binarization):
        record["bits_per_dim"] = _bits_per_dim(model, -record["elbo"])
    return record


def vq_eval_report(model, prior, x: torch.Tensor, binarization: str, seed: int, batch_size: int = 2000) -> dict:
    """`vaekit eval` of a vq run on preprocessed images x [N,C,H,W]: the two-stage bound ("elbo",
    under the learned prior, or the uniform one when none is trained: "prior" says which), its
    distortion and rate, each mean with its standard error over the images. "k" is 1: the
    posterior q(c|x) is one-hot, so K importance draws would be K copies of c(x) and the IWAE
    bound equals the ELBO; "iwae_bound" and "nll_upper_bound" are that same bound."""
    start = time.perf_counter()
    terms = vq_terms(model, x, batch_size, prior)                                                # [N,2]
    (bound, bound_stderr), (distortion, distortion_stderr) = (mean_and_stderr(terms[:, i]) for i in range(2))
    rate, rate_stderr = mean_and_stderr(-terms[:, 0] - terms[:, 1])
    bits = {"bits_per_dim": _bits_per_dim(model, -bound)} if reports_bits(model, binarization) else {}
    return {
        "protocol": protocol(binarization, seed), "binarization": binarization, "seed": seed, "n": len(x),
        "likelihood": model.config.likelihood, "family": "vq", "prior": "learned" if prior is not None else "uniform",
        "elbo": bound, "elbo_stderr": bound_stderr, "distortion": distortion, "distortion_stderr": distortion_stderr,
        "rate": rate, "rate_stderr": rate_stderr, "k": 1, "iwae_bound": bound, "nll_upper_bound": -bound, **bits,
        "codebook_size": model.config.codebook_size, "grid": [model.config.grid_size] * 2,
        "seconds": round(time.perf_counter() - start, 1),
    }


def vq_eval_table(result: dict) -> str:
    """vq_eval_report's record as a table for the terminal."""
    b = result["binarization"]
    side = result["grid"][0]
    prior = "learned prior" if result["prior"] == "learned" else \
        "uniform prior: train its prior for a tighter bound (vaekit train-prior RUN)"
    rows = [(f"two-stage bound log p(x|c) + log p(c) ({prior})", "elbo"),
            ("  distortion  -log p(x|c(x))", "distortion"),
            (f"  rate  -log p(c(x)), {side}x{side} codes of {result['codebook_size']}", "rate")]
    lines = [f"{result['n']} test images, binarization {result['protocol']}; {result['seconds']} s; K=1: the codes "
             "are a one-hot posterior, which importance sampling cannot tighten",
             f"{'':60}{'nats/image':>12}  {'std. error':<10}  binarization"]
    for name, key in rows:
        stderr = result[key + "_stderr"]
        lines.append(f"{name:60}{result[key]:>12.2f}  {'' if stderr is None else f'± {stderr:.2f}':<10}  {b}")
    if "bits_per_dim" in result:
        lines.append(f"{'  = bits/dim, 8-bit scale (the -bound)':60}{result['bits_per_dim']:>12.4f}")
    return "\n".join(lines)
