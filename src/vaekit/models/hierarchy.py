"""What the hierarchical families (ladder_vae.py: layers of vectors; spatial_vae.py: grids of
latents) share: the passes around a bottom-up path, a top layer and a top-down path.

A family supplies three pieces:
  _bottom_up(x) -> features          the deterministic features the posteriors read
  _top_posterior(features) -> (mean, logvar) [B,latent]   q(z_top|x), float32
  _top_down(z_top, features=None, eps=None, means=None) -> (s, log p, log q, rates)
      every layer below the top, drawn from its posterior (with features) or its prior (without;
      at the prior's means when eps is None); with `means`, a list that each layer's posterior
      mean [N,units] is appended to. z_top may hold K draws of each image the features [B,...]
      came from (N = K*B, draw-major): the posterior heads read each image's features once
      (layers.SharedInputHead).
The tools see the top layer: `encode` gives q(z_top|x), `decode(z_top)` takes the layers below
at their prior means, and `decode_prior` draws every layer from the prior.
"""
from __future__ import annotations

import torch

from ..objectives import log_normal_pdf
from .vae import VAE, Terms


class HierarchicalVAE(VAE):
    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z_top|x) of the top layer: (mean, logvar), each [B,latent] in float32."""
        self._one_hot(y)
        return self._top_posterior(self._bottom_up(x))

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None, as_image: bool = False) -> torch.Tensor:
        """Top codes z [B,latent] -> the likelihood's parameters (or `as_image` the image), every
        layer below at its prior's mean given the layers above."""
        self._one_hot(y)
        params = self.decoder(self._top_down(z)[0])
        return self.likelihood.mean(params) if as_image else params

    def decode_prior(self, eps: torch.Tensor | None = None, n: int = 100, generator: torch.Generator | None = None,
                     y: torch.Tensor | None = None) -> torch.Tensor:
        """Images [n,C,H,W] from every layer drawn from its prior: the standard-normal draws `eps`
        [n,noise_dim] (the top layer's first), or new ones from `generator`."""
        self._one_hot(y)
        if eps is None:
            eps = torch.randn(n, self.noise_dim, generator=generator, device=next(self.parameters()).device)
        d = self.config.latent_dim
        s = self._top_down(self.prior_codes(eps[:, :d], generator), eps=eps[:, d:])[0]
        return self.likelihood.mean(self.decoder(s))

    @torch.inference_mode()
    def layer_means(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The posterior mean of every stochastic layer's units for images x [B,C,H,W], top first,
        [B,units] each: the top layer's, then each lower layer's given the layers above at their
        posterior means (what the active-unit count of each layer reads)."""
        features = self._bottom_up(x)
        mean, _ = self._top_posterior(features)
        means = [mean]
        self._top_down(mean, features, torch.zeros(len(x), self.noise_dim - mean.shape[1], device=x.device), means)
        return means

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, eps: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> Terms:
        """One pass with every layer drawn from the posterior: see VAE.forward (eps [..., B, noise_dim])."""
        self._one_hot(y)
        features = self._bottom_up(x)
        mean, logvar = self._top_posterior(features)                                    # [B,D] each
        if eps is None:
            eps = torch.randn(len(x), self.noise_dim, generator=generator, device=x.device)
        draws = eps.shape[:-2]                                                          # () or (K,)
        x_flat = x
        if draws:                           # K draws per image: [K*B, ...]; features stay [B, ...] (_top_down)
            mean, logvar, x_flat = (t.expand(*draws, *t.shape).flatten(0, 1) for t in (mean, logvar, x))
            eps = eps.flatten(0, 1)
        d = self.config.latent_dim
        z_top = self.reparameterize(mean, logvar, eps=eps[:, :d])
        log_pz_top, log_qz_top = self.log_prior(z_top), log_normal_pdf(z_top, mean, logvar)
        s, log_p, log_q, rate = self._top_down(z_top, features, eps[:, d:])
        params = self.decoder(s)
        rate = torch.cat([self.layer_rate(mean, logvar, log_qz_top, log_pz_top)[:, None], rate], dim=-1)
        terms = Terms(params, self.likelihood.log_prob(x_flat, params), log_pz_top + log_p, log_qz_top + log_q, rate)
        return Terms(*(t.unflatten(0, (*draws, len(x))) for t in terms)) if draws else terms
