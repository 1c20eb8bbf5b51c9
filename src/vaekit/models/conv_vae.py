"""The seed's convolutional VAE (TF2 CVAE tutorial), generalised to any square size and channel count.

At 28x28x1 with the Bernoulli likelihood it is the seed's network, layer for layer:
Encoder: x [B,1,28,28] -> Conv(32,3,s2,ReLU) [B,32,13,13] -> Conv(64,3,s2,ReLU) [B,64,6,6]
         -> Flatten [B,2304] -> Linear(2*latent) -> split into mean, logvar [B,latent] each.
Decoder: z [B,latent] -> Linear(7*7*32,ReLU) -> [B,32,7,7] -> ConvT(64,3,s2,ReLU) [B,64,14,14]
         -> ConvT(32,3,s2,ReLU) [B,32,28,28] -> ConvT(1,3,s1) -> logits [B,1,28,28].
Other sizes get one stride-2 stage per halving (config.stages: 2 for 28, 3 for 32, 4 for 64), the
encoder's widths doubling from 32 (32, 64, 128, ...) and the decoder's mirroring them after the
seed's 32-channel reshape at base_size (7 for 28, 4 for 32 and 64). The last layer outputs the
likelihood's parameters: C * params_per_channel channels.

TF's "SAME" stride-2 transposed conv keeps the first 14 of the 15 full-output rows. PyTorch's
`padding=1, output_padding=1` reaches 14 without a crop (faster: no strided copy in the backward),
but keeps rows 1..14 instead: the output grid is shifted by one pixel. That is the default;
`tf_padding=True` computes the full output and crops it exactly as TF does (exact parity).
"""
from __future__ import annotations

import torch
from torch import nn

from .model_config import ModelConfig
from .layers import ConvTranspose2d, FlattenHWC, UnflattenHWC
from .vae import VAE

DECODER_RESHAPE_CHANNELS = 32    # the seed's Reshape((7, 7, 32))


class UpConvReLU(nn.Module):
    """ConvTranspose(k=3, stride 2) doubling H and W, then ReLU. The parameter names do not
    depend on `tf_padding`, so one checkpoint loads into either decoder."""

    def __init__(self, in_ch: int, out_ch: int, tf_padding: bool) -> None:
        super().__init__()
        self.tf_padding = tf_padding
        pad = 0 if tf_padding else 1
        self.conv = ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=pad, output_padding=pad, relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)                 # [B,out,2H+1,2W+1] with tf_padding, else [B,out,2H,2W]
        if self.tf_padding:
            y = y[..., :-1, :-1]         # TF SAME: keep the first 2H rows and columns (ReLU commutes with the crop)
        return y


class ConvVAE(VAE):
    def __init__(self, config: ModelConfig | None = None) -> None:
        config = config or ModelConfig()
        widths = [32 * 2 ** i for i in range(config.stages)]            # [32, 64] for 28x28
        size = config.image_size
        encoder = [nn.Conv2d(config.image_channels + config.num_classes, widths[0], 3, stride=2), nn.ReLU()]
        size = (size - 3) // 2 + 1                                     # valid 3x3, stride 2: 28 -> 13
        for w_in, w_out in zip(widths, widths[1:]):
            encoder += [nn.Conv2d(w_in, w_out, 3, stride=2), nn.ReLU()]
            size = (size - 3) // 2 + 1                                 # 13 -> 6
        encoder += [FlattenHWC(),                                      # TF's NHWC order
                    nn.Linear(widths[-1] * size * size, 2 * config.latent_dim)]
        base, up = config.base_size, [DECODER_RESHAPE_CHANNELS, *reversed(widths)]   # [32, 64, 32] for 28x28
        decoder = [nn.Linear(config.latent_dim + config.num_classes, base * base * up[0]), nn.ReLU(),
                   UnflattenHWC(up[0], base, base)]                    # Keras Reshape((7, 7, 32))
        decoder += [UpConvReLU(w_in, w_out, config.tf_padding) for w_in, w_out in zip(up, up[1:])]
        decoder.append(nn.ConvTranspose2d(up[-1], config.output_channels, 3, stride=1, padding=1))   # the likelihood's parameters
        super().__init__(config, nn.Sequential(*encoder), nn.Sequential(*decoder))
        self._keras_init()

    def _keras_init(self) -> None:
        """Keras defaults, as the seed had them: Glorot-uniform kernels, zero biases."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
