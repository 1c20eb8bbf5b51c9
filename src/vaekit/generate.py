"""Generation tasks. Each is one small function over a model and tensors, shared by the CLI,
the Python API and the web demo. Inputs are images x [N,C,H,W] already preprocessed
(`vaekit.data.preprocess`, once, by the caller: float, in the model's input space) or codes
[N,latent]; outputs are images in [0,1] (the likelihood's mean; Bernoulli: probabilities),
[N,C,H,W] (or [rows,cols,C,H,W] for sweeps). Class-conditional models take their labels where
the task has them (prior_samples, reconstruct); the other tasks are for unconditional models."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .errors import ConfigError
from .likelihoods import Bernoulli
from .objectives import importance_weights, mean_and_stderr, rate_per_dim

PATHS = ("linear", "slerp")
MASKS = ("top", "bottom", "left", "right", "centre")
INPAINT_METHODS = ("pseudo-gibbs", "metropolis")


@torch.inference_mode()
def prior_samples(model, n: int, generator: torch.Generator | None = None, label: int | None = None) -> torch.Tensor:
    """n new images decoded from codes drawn from the prior N(0, I); of class `label` for a
    class-conditional model."""
    y = None if label is None else torch.full((n,), label, device=next(model.parameters()).device)
    return model.decode_prior(n=n, generator=generator, y=y)


@torch.inference_mode()
def reconstruct(model, x: torch.Tensor, generator: torch.Generator | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
    """The seed's 'samples near encoded images': encode x, draw z ~ q(z|x) with the
    reparameterization trick (every layer of a hierarchy), decode. Returns the decodes [N,C,H,W],
    to be shown beside x itself. A vq model's decode of its codes is deterministic."""
    if getattr(model.config, "family", None) == "vq":
        return model.reconstruct(x)
    return model.likelihood.mean(model(x, generator=generator, y=labels).params)


@torch.inference_mode()
def code_prior_samples(vq, prior, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The vq family's new images: n code grids drawn from its learned prior, decoded [n,C,H,W]."""
    return vq.decode_indices(prior.sample(n, generator), as_image=True)


@torch.inference_mode()
def interpolate_codes(vq, x: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """The vq family's path between two images x [2,C,H,W]: linear in the continuous encoder
    output z_e [D,h,w] (before quantisation), each point quantised to its nearest codes and
    decoded. The path is piecewise constant (codes jump from one codebook vector to another) and
    its ends are the two reconstructions. Returns [steps,C,H,W]."""
    a, b = vq.encode(x)                                                   # [D,h,w] each
    t = torch.linspace(0, 1, steps, device=a.device)[:, None, None, None]  # [steps,1,1,1]
    return vq.decode(vq.quantize((1 - t) * a + t * b).z_q, as_image=True)


def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N,...], [N,...] -> [2N,...] as a0, b0, a1, b1, ...: originals beside their decodes in a grid."""
    return torch.stack([a, b], dim=1).flatten(0, 1)


@torch.inference_mode()
def interpolate(model, x: torch.Tensor, steps: int = 10, path: str = "linear") -> torch.Tensor:
    """Decodes `steps` codes on a path between the posterior means a, b of two images x [2,C,H,W]:
    "linear" (1-t) a + t b, or "slerp", the great circle (Shoemake 1985), which avoids the
    straight line's dip in norm midway, where prior draws never lie. Returns [steps,C,H,W]; the
    ends are the decodes of a and b."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}; got {path!r}")
    a, b = model.posterior(x)[0]
    t = torch.linspace(0, 1, steps, device=a.device)[:, None]          # [steps,1]
    omega = torch.arccos(F.cosine_similarity(a, b, dim=0).clamp(-1, 1))
    if path == "linear" or omega < 1e-4:    # (nearly) parallel codes: slerp is the straight line
        z = (1 - t) * a + t * b
    else:
        z = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    return model.decode(z, as_image=True)


@torch.inference_mode()
def traverse(model, x: torch.Tensor, dims: list[int], values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Varies one latent dimension at a time around an image's code: row r sets dimension dims[r]
    of the posterior mean of the image x [1,C,H,W] to each of `values` [S] and keeps the others.
    Returns (codes [R,S,D], decodes [R,S,C,H,W])."""
    code = model.posterior(x)[0][0]                                                    # [D]
    rows, cols = len(dims), len(values)
    z = code.repeat(rows, cols, 1)
    z[torch.arange(rows)[:, None], torch.arange(cols), torch.as_tensor(dims)[:, None]] = values.to(z)
    return z, model.decode(z.flatten(0, 1), as_image=True).unflatten(0, (rows, cols))


@torch.inference_mode()
def set_dims(model, x: torch.Tensor, dims: list[int], values: torch.Tensor) -> torch.Tensor:
    """Decodes the posterior mean of the image x [1,C,H,W] with dimension dims[i] set to values[i] [K],
    all at once (the web demo's sliders; `traverse` varies one at a time). Returns [1,C,H,W]."""
    z = model.posterior(x)[0]                                                          # [1,D]
    z[:, dims] = values.to(z)
    return model.decode(z, as_image=True)


def most_active_dims(model, x: torch.Tensor, n: int) -> tuple[list[int], list[float]]:
    """The `n` latent dimensions with the most KL over images x [N,C,H,W], most first, and
    their KL in nats (see rate_per_dim)."""
    return ranked_dims(*model.posterior(x), n)


def ranked_dims(mean: torch.Tensor, logvar: torch.Tensor, n: int) -> tuple[list[int], list[float]]:
    """most_active_dims of a posterior already computed: (mean, logvar) [N,D] each."""
    rate = rate_per_dim(mean, logvar)
    order = rate.argsort(descending=True)[:n]
    return order.tolist(), rate[order].tolist()


def attribute_vector(codes: torch.Tensor, labels: torch.Tensor, to: int, from_: int | None = None) -> torch.Tensor:
    """The mean code [D] of the images labelled `to` minus that of those labelled `from_` (of all
    the others when None); codes [N,D], labels [N]. Added to a code, it moves toward `to`."""
    others = labels == from_ if from_ is not None else labels != to
    return codes[labels == to].double().mean(0).float() - codes[others].double().mean(0).float()


@torch.inference_mode()
def apply_attribute(model, codes: torch.Tensor, vector: torch.Tensor, strengths: torch.Tensor) -> torch.Tensor:
    """Decodes codes [N,D] + s * vector [D] for each strength s of [S] -> [N,S,C,H,W]."""
    z = codes[:, None] + strengths.to(codes)[None, :, None] * vector        # [N,S,D]
    return model.decode(z.flatten(0, 1), as_image=True).unflatten(0, z.shape[:2])


def mean_image(x: torch.Tensor) -> torch.Tensor:
    """The add-one smoothed mean of binary images x [N,C,H,W] -> probabilities [C,H,W], never 0 or 1."""
    return ((x.double().sum(0) + 1) / (len(x) + 2)).float()


def check_index(name: str, index: int, n: int) -> None:
    """Refuses `index` (the setting `name`: --index, a, b) unless it picks one of a test set's n images."""
    if not 0 <= index < n:
        raise ConfigError(f"{name} {index} is out of range: the test set has {n} images (0..{n - 1})")


def check_count(name: str, count: int, n: int, which: str = "test images") -> None:
    """Refuses `count` (the setting `name`: --n) of the first test images when there are fewer, n
    (`which`: what they are, e.g. "test images labelled 3")."""
    if count > n:
        raise ConfigError(f"{name} {count} is more than the {n} {which}; ask for at most {n}")


def region_mask(name: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """A boolean mask [C,H,W], True = missing: the top/bottom/left/right half or a centre square
    of half the side."""
    c, h, w = shape
    mask = torch.zeros(c, h, w, dtype=torch.bool)
    region = {"top": (slice(0, h // 2), slice(None)), "bottom": (slice(h // 2, h), slice(None)),
              "left": (slice(None), slice(0, w // 2)), "right": (slice(None), slice(w // 2, w)),
              "centre": (slice(h // 4, h // 4 + h // 2), slice(w // 4, w // 4 + w // 2))}
    if name not in region:
        raise ValueError(f"mask must be one of {', '.join(MASKS)}; got {name!r}")
    mask[(slice(None), *region[name])] = True
    return mask


def inpainting_mask(mask: str | Image.Image, shape: tuple[int, int, int], name: str = "mask") -> torch.Tensor:
    """The pixels to fill, bool [C,H,W] (True = missing), from a region's name (MASKS) or a
    picture of the images' size, white (grey level >= 128) = missing; the CLI reads it from a
    file, the web demo from the page's drawing. `name` is the setting that gave it, for the
    one-line refusal of a picture of another size or one that marks no pixel."""
    if isinstance(mask, str):
        pixels = region_mask(mask, shape)
    else:
        _, h, w = shape
        if mask.size != (w, h):
            raise ConfigError(f"{name} is {mask.width}x{mask.height}; the images are {w}x{h}")
        pixels = torch.from_numpy(np.array(mask.convert("L")) >= 128).expand(shape)
    if not pixels.any():
        raise ConfigError(f"{name} marks no pixel to fill: paint the missing pixels white (on the demo's page, red)")
    return pixels


@torch.inference_mode()
def inpaint(model, x: torch.Tensor, mask: torch.Tensor, steps: int = 50, chains: int = 4,
            method: str = "pseudo-gibbs", start: torch.Tensor | None = None,
            generator: torch.Generator | None = None,
            stop: Callable[[int], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fills the pixels of binary images x [N,C,H,W] (values in {0, 1}) where mask [C,H,W] is True,
    the observed pixels clamped to x's.

    Each of `chains` independent chains per image starts with the missing pixels drawn from
    Bernoulli(start) (start [C,H,W], e.g. the training set's mean image; default: all off), then
    each step encodes the completion, draws z ~ q(z|x), decodes, and draws the missing pixels from
    p(x|z) ("pseudo-gibbs", Rezende et al. 2014). "metropolis" keeps the new z only with the
    Metropolis-Hastings ratio w(z')/w(z), w = p(x,z)/q(z|x) (Mattei & Frellsen 2018), so the
    chain targets the model's true conditional p(z, x_missing | x_observed).
    Returns (completion: x with the missing pixels' predictive probabilities, predictive logits
    [N,C,H,W]: logit of the mean of p(x_j|z) over all chains and steps). One
    sharp decode is confidently wrong wherever a stroke lands a pixel off; the mean over many
    steps and chains is what makes the predictive fit the truth (longer chains help most).
    `stop`, if given, is called after each step with the number of steps done; True ends the
    chains there (the web demo bounds the time one request may hold the model with it)."""
    if method not in INPAINT_METHODS:
        raise ValueError(f"method must be one of {', '.join(INPAINT_METHODS)}; got {method!r}")
    refusal = inpaint_refusal(model.config, method)
    if refusal:
        raise ValueError(refusal)
    xs = x.repeat(chains, 1, 1, 1)                          # [chains*N,C,H,W], chain-major
    missing = mask.to(x.device).expand_as(xs)
    init = torch.zeros_like(xs) if start is None else torch.bernoulli(start.to(xs).expand_as(xs), generator=generator)
    current = torch.where(missing, init, xs)
    log_on = log_off = torch.full_like(xs, -torch.inf)      # log sum_t p_t(x_j = 1), log sum_t p_t(x_j = 0)
    z = logits = None
    for step in range(1, steps + 1):
        mean, logvar = model.encode(current)
        z_new = model.reparameterize(mean, logvar, generator)
        logits_new = model.decode(z_new)
        if method == "metropolis" and z is not None:
            log_w_new, log_w = importance_weights(current, torch.stack([logits_new, logits]),
                                                  torch.stack([z_new, z]), mean, logvar)
            u = torch.rand(len(xs), generator=generator, device=x.device)
            accept = u.log() < log_w_new - log_w                                 # [chains*N]
            z = torch.where(accept[:, None], z_new, z)
            logits = torch.where(accept[:, None, None, None], logits_new, logits)
        else:
            z, logits = z_new, logits_new
        current = torch.where(missing, torch.bernoulli(torch.sigmoid(logits), generator=generator), xs)
        log_on = torch.logaddexp(log_on, F.logsigmoid(logits))
        log_off = torch.logaddexp(log_off, F.logsigmoid(-logits))
        if stop is not None and stop(step):
            break
    chain_axis = (chains, len(x))
    predictive = log_on.unflatten(0, chain_axis).logsumexp(0) - log_off.unflatten(0, chain_axis).logsumexp(0)
    return torch.where(mask.to(x.device), torch.sigmoid(predictive), x), predictive


@torch.inference_mode()
def inpainting_log_likelihood(model, x: torch.Tensor, mask: torch.Tensor, mean_image: torch.Tensor,
                              generator: torch.Generator, steps: int, chains: int, method: str,
                              batch_size: int = 2000) -> dict:
    """log p of the true masked pixels of binary images x [N,C,H,W], nats per image, under the
    predictive of `inpaint` (its chains start from `mean_image`, draw from `generator`) and under
    the baseline that fills them with `mean_image` [C,H,W] (probabilities in (0,1), see
    mean_image), each with its standard error over the images (`*_stderr`; None for one image).
    mask [C,H,W], True = missing; `batch_size` bounds the decodes at once (images x chains)."""
    baseline_logits = torch.logit(mean_image.to(x.device))
    per_image = []   # [B,2] a pass: log p under the inpainting's predictive, under the baseline
    per_pass = max(1, batch_size // chains)
    with tqdm(total=len(x), desc="inpainting score", unit="img", leave=False, disable=None) as bar:
        for start in range(0, len(x), per_pass):
            xb = x[start:start + per_pass]
            _, logits = inpaint(model, xb, mask, steps, chains, method, mean_image, generator)
            per_image.append(torch.stack([Bernoulli.log_prob(xb, logits, mask),
                                          Bernoulli.log_prob(xb, baseline_logits.expand_as(xb), mask)], dim=1).double())
            bar.update(len(xb))
    values = torch.cat(per_image)
    values = torch.cat([values, values[:, :1] - values[:, 1:]], dim=1)      # [N,3]: inpainting, baseline, gain
    record = {"n": len(x), "masked_pixels": int(mask.sum()), "steps": steps, "chains": chains, "method": method}
    for name, column in zip(("inpainting", "mean_image_baseline", "gain"), values.T):
        record[name], record[f"{name}_stderr"] = mean_and_stderr(column)
    return record


def inpaint_refusal(config, method: str) -> str | None:
    """Why `inpaint` cannot run `method` on a model of `config` (None: it can). Its chains encode
    and decode one layer of z, and the metropolis ratio takes the prior N(0, I)."""
    if config.layers_of_z > 1:
        return (f"inpainting encodes and decodes one layer of z, and this {config.family} model has "
                f"{config.layers_of_z}: use a conv or resnet model")
    if method == "metropolis" and config.prior != "standard":
        return "the metropolis chain weighs codes under the prior N(0, I); with the vamp prior use pseudo-gibbs"
    return None


@torch.inference_mode()
def manifold(model, n: int = 20) -> torch.Tensor:
    """For a 2-D latent: decodes an n x n grid of codes at equal prior-probability steps, the
    inverse normal CDF of 0.05..0.95 (Kingma & Welling 2014, fig. 4); z1 grows to the right,
    z2 upward. Returns [n*n,C,H,W], row by row."""
    if model.latent_dim != 2:
        raise ValueError(f"the manifold needs a 2-D latent, this model has {model.latent_dim}")
    v = torch.special.ndtri(torch.linspace(0.05, 0.95, n, device=next(model.parameters()).device))
    z2, z1 = torch.meshgrid(v.flip(0), v, indexing="ij")
    return model.decode(torch.stack([z1, z2], dim=-1).flatten(0, 1), as_image=True)


@dataclass(frozen=True)
class LatentPlane:
    """The plane a latent map shows: the point (u, v) of the map is the code origin + u axes[0] +
    v axes[1]; origin [D] and orthonormal axes [2,D] in float64, with the axes' names. For D = 2
    the plane is the latent itself; else it passes through the codes' mean along their first two
    principal components, each named with the share of the variance it explains."""
    origin: torch.Tensor
    axes: torch.Tensor
    names: list[str]

    @classmethod
    def of(cls, codes: torch.Tensor) -> LatentPlane:
        """The plane of codes [N,D]."""
        if codes.shape[1] == 2:
            return cls(torch.zeros(2, dtype=torch.float64, device=codes.device),
                       torch.eye(2, dtype=torch.float64, device=codes.device), ["z1", "z2"])
        centre = codes.double().mean(0)
        _, s, v = torch.linalg.svd(codes.double() - centre, full_matrices=False)
        share = s.pow(2) / s.pow(2).sum()
        return cls(centre, v[:2], [f"PC{i + 1} ({100 * share[i]:.0f}% of variance)" for i in range(2)])

    def project(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [N,D] -> their coordinates on the plane [N,2] (float32): for D = 2 the codes themselves."""
        return ((codes.double() - self.origin) @ self.axes.T).float()

    def code(self, points: torch.Tensor) -> torch.Tensor:
        """points [M,2] of the map -> the codes there [M,D] (float32), to decode."""
        return (self.origin + points.to(self.axes) @ self.axes).float()
