"""ModelConfig: what the model families share (the image, the code, the likelihood, the training
objective, the class conditioning). The command line makes one flag of each field."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..likelihoods import LIKELIHOODS, get_likelihood

FAMILIES = ("conv", "resnet", "ladder", "spatial", "vq")
PRIORS = ("standard", "vamp")
OBJECTIVES = ("elbo", "iwae")


def setting(default, help: str):
    """A config field with its default and the help line its command-line flag shows (every
    config dataclass, here and in vaekit/config.py, declares its fields with it)."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    family: str = setting("conv", "conv: the seed's architecture, generalised to any size; resnet: residual stages for "
                          "32-64 px images; ladder: hierarchical, --stochastic-layers layers of z with a top-down path; "
                          "spatial: hierarchical, grids of latents at the decoder's resolutions (NVAE-style); "
                          "vq: discrete codes on a grid (VQ-VAE), then `vaekit train-prior` fits their prior")
    latent_dim: int = setting(50, "dimensions of z (the seed's 50); of each layer for the ladder family")
    image_channels: int = setting(1, "1 = grey, 3 = RGB; training sets it from the data")
    image_size: int = setting(28, "the side of the square images; the number of stride-2 stages follows from it")
    tf_padding: bool = setting(False, "conv: TF's SAME cropping in the decoder, so the output grid matches the seed's "
                               "pixel for pixel (slower); without it the grid is shifted by one pixel")
    likelihood: str = setting("bernoulli", "bernoulli (binary data), gaussian, gaussian-fixed or logistic (8-bit)")
    fixed_scale: float = setting(0.1, "gaussian-fixed: the scale of every pixel, on [0, 1]")
    allow_continuous_bernoulli: bool = setting(False, "use bernoulli on grey levels anyway (not a likelihood of them)")
    beta: float = setting(1.0, "beta-VAE weight of the rate in the training loss (reports stay at beta 1)")
    objective: str = setting("elbo", "elbo: the seed's single-sample estimator; iwae: the IWAE bound with "
                                     "--iwae-k draws")
    iwae_k: int = setting(5, "importance samples per image of the iwae objective")
    conditional: bool = setting(False, "class-conditional: the one-hot label goes to encoder and decoder")
    num_classes: int = setting(0, "of a conditional model; 0: the data's, written to config.json in training")
    stochastic_layers: int = setting(0, "layers of z; 0: the family's own (conv, resnet: 1; ladder: 2)")
    prior: str = setting("standard", "standard: N(0, I), the seed's; vamp: the VampPrior, a mixture of the posteriors "
                         "of learned pseudo-inputs (Tomczak & Welling 2018)")
    pseudo_inputs: int = setting(500, "vamp: the learned pseudo-inputs, one mixture component each")
    codebook_size: int = setting(512, "vq: the codebook's vectors (K), the values each code of the grid can take")
    code_dim: int = setting(64, "vq: the dimensions of each codebook vector (D)")
    hidden_channels: int = setting(64, "vq: the channels of the encoder's and decoder's feature maps (even); "
                                   "spatial: of the smallest grid, halving at each larger one")
    res_blocks: int = setting(2, "vq: residual blocks in the encoder and in the decoder; spatial: in each bottom-up "
                              "stage and before each group of latents")
    latent_channels: int = setting(8, "spatial: the channels of each group's grid of latents")
    latent_groups: int = setting(2, "spatial: groups of latents at each scale (7x7, 14x14 for 28 px), each a layer")
    commitment: float = setting(0.25, "vq: beta, the weight of the commitment loss ||z_e - sg(e)||^2")
    ema_decay: float = setting(0.99, "vq: the decay of the codebook's moving averages")
    dead_after: int = setting(100, "vq: a code no encoder output chose for this many steps restarts at one")
    prior_width: int = setting(128, "vq: the width of the code prior's transformer (`vaekit train-prior`)")
    prior_layers: int = setting(4, "vq: the code prior's transformer blocks")
    prior_heads: int = setting(4, "vq: the code prior's attention heads (they divide --prior-width)")

    def __post_init__(self) -> None:
        for name, value, allowed in (("family", self.family, FAMILIES), ("likelihood", self.likelihood, LIKELIHOODS),
                                     ("objective", self.objective, OBJECTIVES), ("prior", self.prior, PRIORS)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        for name in ("latent_dim", "image_channels", "iwae_k", "pseudo_inputs"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}: pass {flag} 1 or more")
        if self.image_size < 8 or self.image_size % 2:
            raise ConfigError(f"image_size must be even and at least 8, got {self.image_size}: fix --image-size")
        for name in ("beta", "fixed_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}: fix --{name.replace('_', '-')}")
        if self.objective == "iwae" and self.beta != 1:
            raise ConfigError("beta weights the elbo objective's rate; the iwae objective has none: drop --beta")
        if self.num_classes < 0:
            raise ConfigError(f"num_classes must be >= 0 (0: the data's), got {self.num_classes}: fix --num-classes")
        if self.num_classes and not self.conditional:
            raise ConfigError(f"num_classes {self.num_classes} is for conditional models: pass --conditional or "
                              "drop --num-classes")

        if self.family == "spatial" and self.stochastic_layers:
            raise ConfigError("the spatial family's layers are --latent-groups at each scale, plus the top one: "
                              "drop --stochastic-layers")
        if self.stochastic_layers < 0:
            raise ConfigError(f"stochastic_layers must be >= 0 (0: the family's own), got {self.stochastic_layers}: "
                              "fix --stochastic-layers")
        if self.stochastic_layers > 1 and self.family != "ladder":
            raise ConfigError(f"stochastic_layers {self.stochastic_layers}: the {self.family} family has one layer of "
                              "z; pass --family ladder for more")
        if self.family == "ladder" and self.stochastic_layers == 1:
            raise ConfigError("the ladder family has 2 or more stochastic layers: pass --stochastic-layers 2 or more")
        self._check_vq()

    def _check_vq(self) -> None:
        """The vq and spatial families' sizes, and the settings of the Gaussian families vq does not take."""
        for name in ("codebook_size", "code_dim", "hidden_channels", "dead_after", "prior_width", "prior_layers",
                     "prior_heads", "latent_channels", "latent_groups"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}: pass --{name.replace('_', '-')} "
                                 "1 or more")
        if self.hidden_channels % 2:
            raise ConfigError(f"hidden_channels must be even, got {self.hidden_channels}: fix --hidden-channels")
        if self.res_blocks < 0:
            raise ConfigError(f"res_blocks must be >= 0, got {self.res_blocks}: fix --res-blocks")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}: fix --ema-decay")
        if not self.commitment >= 0:
            raise ConfigError(f"commitment must be >= 0, got {self.commitment}: fix --commitment")
        if self.prior_width % self.prior_heads:
            raise ConfigError(f"prior_heads {self.prior_heads} does not divide prior_width {self.prior_width}: fix "
                              "--prior-heads or --prior-width")
        if self.family != "vq":
            return
        if self.image_size % 4:
            raise ConfigError(f"the vq family takes images whose side is a multiple of 4, got {self.image_size}: "
                             "resize them (--resize)")
        refused = [flag for flag, used in (("--conditional", self.conditional), ("--prior vamp", self.prior == "vamp"),
                                           ("--objective iwae", self.objective == "iwae"), ("--beta", self.beta != 1),
                                           ("--stochastic-layers", self.stochastic_layers > 1)) if used]
        if refused:
            raise ConfigError(f"the vq family has discrete codes and a prior of its own: drop {', '.join(refused)}")

    @property
    def layers_of_z(self) -> int:
        """The stochastic layers: stochastic_layers, or the family's own number when it is 0 (spatial:
        the top layer and each scale's groups)."""
        if self.family == "spatial":
            return 1 + self.latent_groups * self.stages
        return self.stochastic_layers or (2 if self.family == "ladder" else 1)

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
    def grid_size(self) -> int:
        """vq: the side of the code grid, image_size / 4 (7 for 28x28)."""
        return self.image_size // 4

    @property
    def output_channels(self) -> int:
        """Decoder outputs: the likelihood's parameters for each image channel."""
        return self.image_channels * self.likelihood_fn.params_per_channel

    @property
    def likelihood_fn(self):
        """The likelihood object (see likelihoods.py) that `likelihood` names."""
        return get_likelihood(self.likelihood, self.fixed_scale)

