"""The seed's architecture: shapes, parameter count, and the TF-parity decoder option; the
generalised conv and ResNet families at other sizes, channel counts, likelihoods and conditioning."""
import pytest
import torch

from vaekit.likelihoods import get_likelihood
from vaekit.models import ConvVAE, LadderVAE, ModelConfig, ResNetVAE, SpatialVAE, build_model


def keras_param_count(latent):
    enc = (1 * 9 * 32 + 32) + (32 * 9 * 64 + 64) + (6 * 6 * 64 * 2 * latent + 2 * latent)
    dec = (latent * 7 * 7 * 32 + 7 * 7 * 32) + (32 * 9 * 64 + 64) + (64 * 9 * 32 + 32) + (32 * 9 * 1 + 1)
    return enc + dec


@pytest.mark.parametrize("tf_padding", [False, True])
def test_shapes_follow_the_seed(tf_padding):
    model = ConvVAE(ModelConfig(latent_dim=50, tf_padding=tf_padding))
    x = torch.rand(5, 1, 28, 28)
    assert model.encoder[:2](x).shape == (5, 32, 13, 13)
    assert model.encoder[:4](x).shape == (5, 64, 6, 6)
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (5, 50)
    z = model.reparameterize(mean, logvar)
    assert model.decoder[:3](z).shape == (5, 32, 7, 7)
    logits = model.decode(z)
    assert logits.shape == (5, 1, 28, 28)
    probs = model.decode(z, as_image=True)
    assert probs.min() >= 0 and probs.max() <= 1
    assert model.decode_prior(n=3).shape == (3, 1, 28, 28)
    assert sum(p.numel() for p in model.parameters()) == keras_param_count(50)


def test_tf_padding_is_the_same_computation_shifted_by_one_pixel():
    """Both decoders share weights; TF's crop keeps full-output rows 0..13, torch's padding rows 1..14."""
    torch.manual_seed(0)
    fast, exact = ConvVAE(ModelConfig(latent_dim=4)), ConvVAE(ModelConfig(latent_dim=4, tf_padding=True))
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
        ModelConfig(latent_dim=0)


@pytest.mark.parametrize("size, stages, base", [(28, 2, 7), (32, 3, 4), (64, 4, 4), (48, 3, 6)])
def test_depth_follows_the_image_size(size, stages, base):
    config = ModelConfig(image_size=size)
    assert (config.stages, config.base_size) == (stages, base)


@pytest.mark.parametrize("family", ["conv", "resnet", "ladder", "spatial"])
@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("channels, likelihood", [(1, "bernoulli"), (3, "logistic"), (3, "gaussian-fixed")])
def test_any_size_and_channel_count(family, size, channels, likelihood):
    config = ModelConfig(family=family, image_size=size, image_channels=channels, likelihood=likelihood, latent_dim=6)
    model = build_model(config)
    assert isinstance(model, {"conv": ConvVAE, "resnet": ResNetVAE, "ladder": LadderVAE, "spatial": SpatialVAE}[family])
    x = torch.rand(2, channels, size, size)
    terms = model(x)
    per_channel = get_likelihood(likelihood).params_per_channel
    assert terms.params.shape == (2, channels * per_channel, size, size)
    assert terms.log_w.shape == (2,) and terms.rate.shape == (2, config.layers_of_z)
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (2, 6)
    images = model.decode_prior(n=3)
    assert images.shape == (3, channels, size, size) and images.min() >= 0 and images.max() <= 1
    assert model.decode(mean, as_image=True).shape == (2, channels, size, size)
    draws = model(x, eps=torch.randn(4, 2, model.noise_dim))    # K = 4 draws per image, as the IWAE bound takes
    assert draws.params.shape == (4, 2, channels * per_channel, size, size) and draws.log_w.shape == (4, 2)


def test_conditional_model_takes_labels_in_encoder_and_decoder():
    model = ConvVAE(ModelConfig(conditional=True, num_classes=10, latent_dim=4))
    assert model.encoder[0].in_channels == 1 + 10 and model.decoder[0].in_features == 4 + 10
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 9])
    assert model(x, y=y).params.shape == (3, 1, 28, 28)
    z = torch.randn(1, 4).expand(2, 4)
    zero, one = model.decode(z, torch.tensor([0, 1]))
    assert not torch.equal(zero, one)                        # the label changes the decode of the same code
    with pytest.raises(ValueError, match="give the labels"):
        model.encode(x)
    with pytest.raises(ValueError, match="give no label"):
        ConvVAE(ModelConfig(latent_dim=4)).encode(x, y)


@pytest.mark.parametrize("stride, padding, output_padding, size", [(2, 1, 1, 7), (2, 0, 0, 14), (1, 1, 0, 28)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_transposed_conv_matches_autograd(stride, padding, output_padding, size, channels_last, relu, dtype):
    """layers.ConvTranspose2d (and its relu=True form) computes what nn.ConvTranspose2d (then a
    ReLU) computes, forward and backward. float32 on CPU takes oneDNN's fused conv+ReLU kernel,
    float64 the plain one."""
    from vaekit.models.layers import ConvTranspose2d, onednn_runs

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref = torch.nn.ConvTranspose2d(8, 4, 3, stride=stride, padding=padding, output_padding=output_padding).to(dtype)
    fast = ConvTranspose2d(8, 4, 3, stride=stride, padding=padding, output_padding=output_padding, relu=relu).to(dtype)
    fast.load_state_dict(ref.state_dict())
    ref, fast = ref.to(memory_format=fmt), fast.to(memory_format=fmt)
    x = torch.randn(3, 8, size, size, dtype=dtype).to(memory_format=fmt)
    assert onednn_runs(x) == (dtype == torch.float32 and torch.backends.mkldnn.is_available())

    def reference(inp):
        y = ref(inp)
        return torch.relu(y) if relu else y

    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(reference(xr))
    reference(xr).backward(g)
    fast(xf).backward(g)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(fast(x), reference(x), **tol)
    torch.testing.assert_close(xf.grad, xr.grad, **tol)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, **tol)
    torch.testing.assert_close(fast.bias.grad, ref.bias.grad, **tol)
    if relu:
        assert (fast(x) == 0).any() and (fast(x) >= 0).all()    # the ReLU did cut something


def test_fast_transposed_conv_under_bf16_autocast():
    """Under autocast it computes in bf16 like nn.ConvTranspose2d then ReLU (the fused kernel on
    CPU) and returns fp32 parameter grads."""
    from vaekit.models.layers import ConvTranspose2d

    torch.manual_seed(0)
    ref = torch.nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1)
    fast = ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1, relu=True)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(4, 16, 7, 7)
    outs = []
    for layer, forward in ((ref, lambda inp: torch.relu(ref(inp))), (fast, fast)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = forward(x)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        assert layer.weight.grad.dtype == torch.float32
        outs.append((y, layer.weight.grad, layer.bias.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_flatten_follows_tf_nhwc_order():
    from vaekit.models.layers import FlattenHWC, UnflattenHWC

    x = torch.arange(2 * 3 * 2 * 2.0).view(2, 3, 2, 2)
    flat = FlattenHWC()(x)
    assert flat[0, :3].tolist() == x[0, :, 0, 0].tolist()     # channels vary fastest, as in NHWC
    torch.testing.assert_close(UnflattenHWC(3, 2, 2)(flat), x)
    assert UnflattenHWC(3, 2, 2)(flat).is_contiguous(memory_format=torch.channels_last)


def test_a_few_steps_lower_the_resnet_loss_on_real_digits():
    """Gradients flow through the whole ResNet VAE and the discretized logistic: 8 Adam steps on
    one batch of real MNIST grey levels lower its loss (the conv family trains in test_variants.py)."""
    from conftest import SAMPLE
    from vaekit.data import load_splits, preprocess
    from vaekit.objectives import training_loss

    torch.manual_seed(0)
    x = preprocess(load_splits("mnist", SAMPLE).train.images[:16], "none")
    model = build_model(ModelConfig(family="resnet", likelihood="logistic", latent_dim=8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = training_loss(model(x, generator=torch.Generator().manual_seed(1))).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("out_channels, size, padding, stride", [(1, 28, 1, 4), (1, 30, 1, 2), (2, 28, 1, 2),
                                                                 (3, 32, 0, 2), (1, 28, 2, 4)])
def test_subpixel_form_equals_the_transposed_convolution_in_float64(out_channels, size, padding, stride):
    """The one-channel output layer rewritten as a stride-s convolution plus a pixel shuffle is the
    same function, to float64 rounding."""
    import torch.nn.functional as F

    from vaekit.models.inference import conv_transpose_as_conv, subpixel_conv

    torch.manual_seed(0)
    layer = torch.nn.ConvTranspose2d(32, out_channels, 3 + 2 * (padding == 2), stride=1, padding=padding).double()
    x = torch.randn(3, 32, size, size, dtype=torch.float64)
    weight, conv_padding = conv_transpose_as_conv(layer.weight.detach(), padding)
    sub_weight, sub_bias = subpixel_conv(weight, layer.bias.detach(), stride)
    assert sub_weight.shape[0] == out_channels * stride ** 2
    y = F.pixel_shuffle(F.conv2d(x, sub_weight, sub_bias, stride=stride, padding=conv_padding), stride)
    torch.testing.assert_close(y, layer(x), rtol=0, atol=1e-12)


INFERENCE_FORMS = [
    ("conv", {}), ("conv", {"tf_padding": True}), ("conv", {"image_size": 32, "image_channels": 3}),
    ("conv", {"conditional": True, "num_classes": 10}), ("conv", {"prior": "vamp", "pseudo_inputs": 7}),
    ("resnet", {"image_size": 32, "image_channels": 3, "likelihood": "logistic"}),
    ("ladder", {"latent_dim": 8, "stochastic_layers": 3}),
    ("spatial", {"latent_dim": 8, "hidden_channels": 16, "res_blocks": 1, "prior": "vamp", "pseudo_inputs": 5})]


def model_and_inputs(family: str, config: dict, n: int = 37):
    """A model of `family` with weights away from Keras's zero biases (in eval mode, channels_last
    as training keeps it), and n images, labels (or None) and K = 3 draws of noise for it."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(family=family, **config)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    model = model.to(memory_format=torch.channels_last)
    c = model.config
    x = torch.rand(n, c.image_channels, c.image_size, c.image_size).round()
    y = torch.arange(n) % 10 if c.conditional else None
    return model, x, y, torch.randn(3, n, model.noise_dim)


def passes(model, x, y, eps) -> dict:
    """What the tools ask of a model: decode, encode and a K-draw pass's log weights."""
    with torch.inference_mode():
        mean, logvar = model.encode(x, y)
        return {"decode": model.decode(mean, y), "mean": mean, "logvar": logvar, "log_w": model(x, eps=eps, y=y).log_w}


@pytest.mark.parametrize("family, config", INFERENCE_FORMS)
def test_the_inference_form_computes_what_the_model_computes(family, config):
    """prepare_for_inference (weights laid out once, the subpixel output layer) in fp32 decodes,
    encodes and weighs draws as the model does; the model itself is left as it was."""
    from vaekit.distributed import setup
    from vaekit.models.inference import prepare_for_inference

    model, x, y, eps = model_and_inputs(family, config)
    want = passes(model, x, y, eps)
    prepared = prepare_for_inference(model, setup("cpu", "fp32"))
    got = passes(prepared, x, y, eps)
    for name in want:
        assert got[name].dtype == torch.float32, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4)
    assert all(p.requires_grad for p in model.parameters())          # the original still trains
    for name, value in passes(model, x, y, eps).items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0)


@pytest.mark.parametrize("family, config", INFERENCE_FORMS[::2])
def test_the_inference_form_in_bf16_computes_what_the_model_computes_under_autocast(family, config):
    """In bf16 the prepared model computes what the model computes under training's bf16 autocast
    (emulated where the CPU lacks bf16), within bf16's rounding, and hands back float32."""
    from vaekit.distributed import setup
    from vaekit.models.inference import prepare_for_inference

    model, x, y, eps = model_and_inputs(family, config)
    rt = setup("cpu", "bf16")
    with rt.autocast():
        want = passes(model, x, y, eps)
    got = passes(prepare_for_inference(model, rt), x, y, eps)
    for name in want:
        assert got[name].dtype == torch.float32, name
        scale = want[name].abs().mean().item() + 1e-3
        assert (got[name] - want[name].float()).abs().mean().item() < 0.02 * scale, name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_prepared_model_keeps_its_precision_under_any_autocast(precision):
    """A prepared model carries its precision: an autocast around it (a caller's, or none) changes
    nothing, so no caller has to wrap it (evaluate.py does not)."""
    from vaekit.distributed import setup
    from vaekit.models.inference import prepare_for_inference

    for family, config in (INFERENCE_FORMS[4], INFERENCE_FORMS[-2], INFERENCE_FORMS[-1]):   # the VampPrior, the hierarchies
        model, x, y, eps = model_and_inputs(family, config, n=5)
        prepared = prepare_for_inference(model, setup("cpu", precision))
        assert prepared.inference_precision == precision and model.inference_precision is None
        plain = passes(prepared, x, y, eps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            wrapped = passes(prepared, x, y, eps)
        for name in plain:
            torch.testing.assert_close(wrapped[name], plain[name], rtol=0, atol=0)
