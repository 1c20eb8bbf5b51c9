"""Evaluation: exact sums over the whole test set (no dropped or padded tail), then one division.

Every number is stated with its binarization protocol: the seed's static threshold, or one
seeded Bernoulli draw of the test set ("dynamic"), so that numbers are reproducible; or the grey
levels themselves ("none"), where bits per dimension on the 8-bit scale are reported too.

A class-conditional model scores log p(x|y) and needs the images' labels."""
from __future__ import annotations

import time

import torch
from tqdm import tqdm

from .data import preprocess
from .distributed import Runtime
from .generate import inpaint, posterior, rate_per_dim
from .likelihoods import Bernoulli, bits_per_dim
from .objectives import analytic_elbo_terms, importance_weights, iwae_bound, single_sample_elbo

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


@torch.inference_mode()
def evaluate_elbo(model, images: torch.Tensor, binarization: str, runtime: Runtime,
                  batch_size: int = 2000, seed: int = 0, labels: torch.Tensor | None = None) -> dict:
    """Test ELBO in nats per image over all of `images` (uint8 [N,C,H,W] on runtime.device).

    `elbo` is the seed's single-sample estimator (what it prints every epoch); `distortion`
    (-log p(x|z)) and `rate` (analytic KL) are the same pass's parts, and `elbo_analytic_kl`
    = -(distortion + rate), a lower-variance estimate of the same bound. The test set is
    binarised once with a generator seeded by `seed` (then used for z), so `evaluate` scores
    the very same binary images. Always the ELBO (beta 1), whatever the training objective;
    with grey levels ("none") also `bits_per_dim`, of -elbo on the 8-bit scale."""
    was_training = model.training
    model.eval()
    gen = runtime.generator(seed)
    x_all = preprocess(images, binarization, gen)   # [N,C,H,W] in {0,1} (or [0,1] for "none")
    sums = torch.zeros(3, dtype=torch.float64, device=runtime.device)
    for start in range(0, len(x_all), batch_size):
        x = x_all[start:start + batch_size]
        y = None if labels is None else labels[start:start + batch_size]
        with runtime.autocast():
            mean, logvar = model.encode(x, y)
            z = model.reparameterize(mean, logvar, gen)
            params = model.decode(z, y)
        elbo = single_sample_elbo(x, params, z, mean, logvar, model.likelihood)
        distortion, rate = analytic_elbo_terms(x, params, mean, logvar, model.likelihood)
        sums += torch.stack([elbo.sum(), distortion.sum(), rate.sum()]).double()
    model.train(was_training)
    elbo, distortion, rate = (sums / len(images)).tolist()
    result = {"elbo": elbo, "distortion": distortion, "rate": rate,
              "elbo_analytic_kl": -(distortion + rate), "n": len(images)}
    if reports_bits(model, binarization):
        result["bits_per_dim"] = _bits_per_dim(model, -elbo)
    return result


@torch.inference_mode()
def iwae_bounds(model, x: torch.Tensor, k: int, generator: torch.Generator | None = None,
                batch_size: int = 2000, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The IWAE bound log (1/K) sum_k p(x,z_k)/q(z_k|x), z_k ~ q(z|x), for each preprocessed image
    of x [N,C,H,W] (and label) -> [N] (nats; -bound is an upper bound on the NLL that tightens as K grows).

    At most `batch_size` images are decoded at once: max(1, batch_size // K) images at a time,
    their K draws in chunks, the log weights [K,B] joined and reduced with one logsumexp."""
    per_pass = max(1, batch_size // k)              # images per pass
    chunk = max(1, batch_size // per_pass)          # draws per decode, per image
    bounds = []
    for start in tqdm(range(0, len(x), per_pass), desc=f"IWAE K={k}", unit="batch", leave=False, disable=None):
        xb = x[start:start + per_pass]
        yb = None if labels is None else labels[start:start + per_pass]
        mean, logvar = model.encode(xb, yb)         # [B,D] each
        log_w = []
        for done in range(0, k, chunk):
            kc = min(chunk, k - done)
            z = model.reparameterize(mean.expand(kc, *mean.shape), logvar.expand(kc, *logvar.shape), generator)
            y = None if yb is None else yb.repeat(kc)
            params = model.decode(z.flatten(0, 1), y).unflatten(0, (kc, len(xb)))          # [kc,B,C*P,H,W]
            log_w.append(importance_weights(xb, params, z, mean, logvar, model.likelihood))   # [kc,B]
        bounds.append(iwae_bound(torch.cat(log_w)))
    return torch.cat(bounds)


@torch.inference_mode()
def evaluate(model, images: torch.Tensor, binarization: str, runtime: Runtime, k: int = 5000,
             batch_size: int = 2000, seed: int = 0, labels: torch.Tensor | None = None) -> dict:
    """Everything `vaekit eval` reports, in nats per image over all of `images` (uint8 [N,C,H,W]):
    the ELBO (single-sample and analytic-KL, with rate and distortion apart), the IWAE bound
    with K draws and the NLL it bounds, active units and the rate of each latent dimension;
    for grey levels also both in bits per dimension. `labels` [N]: for a conditional model."""
    start = time.perf_counter()
    n = len(images)
    elbo = evaluate_elbo(model, images, binarization, runtime, batch_size, seed, labels)
    x = preprocess(images, binarization, runtime.generator(seed))   # the images evaluate_elbo scored
    mean, logvar = posterior(model, x, batch_size, labels)           # [N,D] each
    unit_variance = mean.double().var(dim=0)                         # diagonal of Cov_x(E_q[z]), [D]
    bound = iwae_bounds(model, x, k, runtime.generator(seed + 1), batch_size, labels).double().sum().item() / n
    bits = {"nll_bits_per_dim": _bits_per_dim(model, -bound)} if reports_bits(model, binarization) else {}
    return {
        "protocol": protocol(binarization, seed), "binarization": binarization, "seed": seed, "n": n,
        "likelihood": model.config.likelihood, **elbo, "k": k, "iwae_bound": bound, "nll_upper_bound": -bound,
        **bits, "active_units": int((unit_variance > ACTIVE_UNIT_THRESHOLD).sum()), "latent_dim": mean.shape[1],
        "rate_per_dim": [round(r, 4) for r in rate_per_dim(mean, logvar).tolist()],
        "seconds": round(time.perf_counter() - start, 1),
    }


def eval_table(result: dict) -> str:
    """The record of `evaluate` as a table for the terminal, the protocol beside each number."""
    b, k = result["binarization"], result["k"]
    rows = [
        ("test ELBO, single-sample (the seed's)", f"{result['elbo']:.2f}"),
        ("test ELBO, analytic KL", f"{result['elbo_analytic_kl']:.2f}"),
        ("  distortion  -log p(x|z)", f"{result['distortion']:.2f}"),
        ("  rate  KL(q(z|x) || p(z))", f"{result['rate']:.2f}"),
        (f"IWAE bound, K={k}", f"{result['iwae_bound']:.2f}"),
        (f"NLL <= -IWAE bound, K={k}", f"{result['nll_upper_bound']:.2f}"),
        (f"active units (Cov > {ACTIVE_UNIT_THRESHOLD})", f"{result['active_units']}/{result['latent_dim']}"),
    ]
    if "bits_per_dim" in result:
        rows[1:1] = [("  = bits/dim, 8-bit scale (its -ELBO)", f"{result['bits_per_dim']:.4f}")]
        rows[-1:-1] = [(f"  = bits/dim, 8-bit scale (NLL, K={k})", f"{result['nll_bits_per_dim']:.4f}")]
    lines = [f"{result['n']} test images, binarization {result['protocol']}; {result['seconds']} s",
             f"{'':40}{'nats/image':>12}  binarization"]
    lines += [f"{name:40}{value:>12}  {b}" for name, value in rows]
    return "\n".join(lines)


@torch.inference_mode()
def inpainting_log_likelihood(model, images: torch.Tensor, mask: torch.Tensor, mean_image: torch.Tensor,
                              binarization: str, runtime: Runtime, steps: int, chains: int, method: str,
                              batch_size: int = 2000, seed: int = 0) -> dict:
    """log p of the true masked pixels of `images` (uint8 [N,C,H,W]), nats per image, under the
    predictive of `inpaint` (its chains start from `mean_image`) and under the baseline that
    fills them with `mean_image` [C,H,W] (probabilities in (0,1), see generate.mean_image), each
    with its standard error over the images (`*_se`; NaN for one image).
    mask [C,H,W], True = missing; `batch_size` bounds the decodes at once (images x chains)."""
    gen = runtime.generator(seed)
    baseline_logits = torch.logit(mean_image.to(runtime.device))
    per_image = []   # [B,2] a pass: log p under the inpainting's predictive, under the baseline
    per_pass = max(1, batch_size // chains)
    with tqdm(total=len(images), desc="inpainting score", unit="img", leave=False, disable=None) as bar:
        for start in range(0, len(images), per_pass):
            x, _, logits = inpaint(model, images[start:start + per_pass], mask, steps, chains, method, mean_image,
                                   binarization, gen)
            per_image.append(torch.stack([Bernoulli.log_prob(x, logits, mask),
                                          Bernoulli.log_prob(x, baseline_logits.expand_as(x), mask)], dim=1).double())
            bar.update(len(x))
    values = torch.cat(per_image)
    values = torch.cat([values, values[:, :1] - values[:, 1:]], dim=1)      # [N,3]: inpainting, baseline, gain
    (inpainted, baseline, gain), se = values.mean(0).tolist(), (values.std(0) / len(values) ** 0.5).tolist()
    return {"protocol": protocol(binarization, seed), "n": len(images), "masked_pixels": int(mask.sum()),
            "steps": steps, "chains": chains, "method": method, "inpainting": inpainted,
            "mean_image_baseline": baseline, "gain": gain, "inpainting_se": se[0], "mean_image_baseline_se": se[1],
            "gain_se": se[2]}
