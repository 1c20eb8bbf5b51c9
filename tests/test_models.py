"""The seed's architecture: shapes, parameter count, and the TF-parity decoder option."""
import pytest
import torch

from vaekit.models import ConvVAE, ConvVAEConfig


def keras_param_count(latent):
    enc = (1 * 9 * 32 + 32) + (32 * 9 * 64 + 64) + (6 * 6 * 64 * 2 * latent + 2 * latent)
    dec = (latent * 7 * 7 * 32 + 7 * 7 * 32) + (32 * 9 * 64 + 64) + (64 * 9 * 32 + 32) + (32 * 9 * 1 + 1)
    return enc + dec


@pytest.mark.parametrize("tf_padding", [False, True])
def test_shapes_follow_the_seed(tf_padding):
    model = ConvVAE(ConvVAEConfig(latent_dim=50, tf_padding=tf_padding))
    x = torch.rand(5, 1, 28, 28)
    assert model.encoder[:2](x).shape == (5, 32, 13, 13)
    assert model.encoder[:4](x).shape == (5, 64, 6, 6)
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (5, 50)
    z = model.reparameterize(mean, logvar)
    assert model.decoder[:3](z).shape == (5, 32, 7, 7)
    logits = model.decode(z)
    assert logits.shape == (5, 1, 28, 28)
    probs = model.decode(z, apply_sigmoid=True)
    assert probs.min() >= 0 and probs.max() <= 1
    assert model.sample(n=3).shape == (3, 1, 28, 28)
    assert sum(p.numel() for p in model.parameters()) == keras_param_count(50)


def test_tf_padding_is_the_same_computation_shifted_by_one_pixel():
    """Both decoders share weights; TF's crop keeps full-output rows 0..13, torch's padding rows 1..14."""
    torch.manual_seed(0)
    fast, exact = ConvVAE(ConvVAEConfig(latent_dim=4)), ConvVAE(ConvVAEConfig(latent_dim=4, tf_padding=True))
    exact.load_state_dict(fast.state_dict())
    h = torch.randn(2, 32, 7, 7)
    up = fast.decoder[3].conv
    full = torch.nn.functional.conv_transpose2d(h, up.weight, up.bias, stride=2)  # [2,64,15,15]
    torch.testing.assert_close(exact.decoder[3](h), torch.relu(full[..., :14, :14]))
    torch.testing.assert_close(fast.decoder[3](h), torch.relu(full[..., 1:15, 1:15]))


def test_reparameterize_is_seeded_and_matches_moments():
    mean, logvar = torch.full((20000, 2), 1.5), torch.full((20000, 2), 2 * torch.log(torch.tensor(0.5)))
    a = ConvVAE.reparameterize(mean, logvar, torch.Generator().manual_seed(3))
    b = ConvVAE.reparameterize(mean, logvar, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert abs(a.mean().item() - 1.5) < 0.02 and abs(a.std().item() - 0.5) < 0.02


def test_latent_dim_zero_is_refused():
    with pytest.raises(ValueError, match="latent_dim"):
        ConvVAEConfig(latent_dim=0)
