"""Evaluation: exact sums over the whole test set (no dropped or padded tail), then one division."""
from __future__ import annotations

import torch

from .data import preprocess
from .distributed import Runtime
from .objectives import analytic_kl, bernoulli_log_likelihood, single_sample_elbo


@torch.inference_mode()
def evaluate_elbo(model, images: torch.Tensor, binarization: str, runtime: Runtime,
                  batch_size: int = 2000, seed: int = 0) -> dict:
    """Test ELBO in nats per image over all of `images` (uint8 [N,C,H,W] on runtime.device).

    `elbo` is the seed's single-sample estimator (what it prints every epoch); `distortion`
    (-log p(x|z)) and `rate` (analytic KL) are the same pass's parts, and `elbo_analytic_kl`
    = -(distortion + rate), a lower-variance estimate of the same bound."""
    model.eval()
    gen = runtime.generator(seed)
    sums = torch.zeros(3, dtype=torch.float64, device=runtime.device)
    for start in range(0, len(images), batch_size):
        x = preprocess(images[start:start + batch_size], binarization, gen)
        with runtime.autocast():
            mean, logvar = model.encode(x)
            z = model.reparameterize(mean, logvar, gen)
            logits = model.decode(z)
        elbo = single_sample_elbo(x, logits, z, mean, logvar)
        sums += torch.stack([elbo.sum(), -bernoulli_log_likelihood(x, logits).sum(),
                             analytic_kl(mean, logvar).sum()]).double()
    model.train()
    elbo, distortion, rate = (sums / len(images)).tolist()
    return {"elbo": elbo, "distortion": distortion, "rate": rate,
            "elbo_analytic_kl": -(distortion + rate), "n": len(images)}
