"""ModelConfig: what the model families share (the image, the code, the likelihood, the training
objective, the class conditioning). The command line makes one flag of each field."""
from __future__ import annotations

from dataclasses import dataclass

from ..likelihoods import LIKELIHOODS, get_likelihood

FAMILIES = ("conv", "resnet")
OBJECTIVES = ("elbo", "iwae")


@dataclass
class ModelConfig:
    family: str = "conv"              # "conv": the seed's architecture, generalised; "resnet": resnet_vae.py
    latent_dim: int = 50              # the seed's code size
    image_channels: int = 1
    image_size: int = 28              # square images; the number of stride-2 stages follows from it
    tf_padding: bool = False          # conv: exact TF "SAME" cropping in the decoder (slower); see conv_vae.py
    likelihood: str = "bernoulli"     # bernoulli (binary data) | gaussian | gaussian-fixed | logistic (8-bit)
    fixed_scale: float = 0.1          # gaussian-fixed: the scale of every pixel, on [0, 1]
    allow_continuous_bernoulli: bool = False   # use bernoulli on grey levels anyway (not a likelihood of them)
    beta: float = 1.0                 # beta-VAE weight of the rate in the training loss (reports stay at 1)
    objective: str = "elbo"           # "elbo": the seed's single-sample estimator; "iwae": the IWAE bound
    iwae_k: int = 5                   # importance samples per image of the iwae objective
    conditional: bool = False         # class-conditional: the one-hot label goes to encoder and decoder
    num_classes: int = 0              # of a conditional model; 0: the data's, written to config.json in training

    def __post_init__(self) -> None:
        for name, value, allowed in (("family", self.family, FAMILIES), ("likelihood", self.likelihood, LIKELIHOODS),
                                     ("objective", self.objective, OBJECTIVES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        for name in ("latent_dim", "image_channels", "iwae_k"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}: pass {flag} 1 or more")
        if self.image_size < 8 or self.image_size % 2:
            raise ValueError(f"image_size must be even and at least 8, got {self.image_size}: fix --image-size")
        if not self.beta > 0 or not self.fixed_scale > 0:
            raise ValueError(f"beta and fixed_scale must be > 0, got {self.beta} and {self.fixed_scale}")
        if self.objective == "iwae" and self.beta != 1:
            raise ValueError("beta weights the elbo objective's rate; the iwae objective has none: drop --beta")
        if self.num_classes < 0 or (self.num_classes and not self.conditional):
            raise ValueError(f"num_classes {self.num_classes} is for conditional models: pass --conditional or drop it")

    @property
    def stages(self) -> int:
        """Stride-2 stages between the image and the smallest feature map: halve the size while it
        stays even and at least 4 (28 -> 14 -> 7: 2; 32 -> 16 -> 8 -> 4: 3; 64: 4)."""
        n, size = 0, self.image_size
        while size % 2 == 0 and size // 2 >= 4:
            n, size = n + 1, size // 2
        return n

    @property
    def base_size(self) -> int:
        """The side of the decoder's first feature map: image_size / 2**stages (7 for 28, 4 for 32 and 64)."""
        return self.image_size >> self.stages

    @property
    def output_channels(self) -> int:
        """Decoder outputs: the likelihood's parameters for each image channel."""
        return self.image_channels * self.likelihood_fn.params_per_channel

    @property
    def likelihood_fn(self):
        """The likelihood object (see likelihoods.py) that `likelihood` names."""
        return get_likelihood(self.likelihood, self.fixed_scale)

