"""Generation tasks. Each is one small function over a model and tensors, shared by the CLI,
the Python API and the web demo. Inputs are uint8 images [N,C,H,W] or codes [N,latent];
outputs are probabilities in [0,1], [N,C,H,W]."""
from __future__ import annotations

import torch

from .data import preprocess


@torch.inference_mode()
def sample(model, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n new images decoded from codes drawn from the prior N(0, I)."""
    return model.sample(n=n, generator=generator)


@torch.inference_mode()
def reconstruct(model, images: torch.Tensor, binarization: str = "static",
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's 'samples near encoded images': encode, draw z ~ q(z|x) with the
    reparameterization trick, decode. Returns (the binarized inputs, their decodes)."""
    x = preprocess(images, binarization, generator)
    mean, logvar = model.encode(x)
    return x, model.decode(model.reparameterize(mean, logvar, generator), apply_sigmoid=True)


def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N,...], [N,...] -> [2N,...] as a0, b0, a1, b1, ...: originals beside their decodes in a grid."""
    return torch.stack([a, b], dim=1).flatten(0, 1)
