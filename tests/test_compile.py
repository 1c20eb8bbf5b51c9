"""torch.compile of every model family (issue 23): the training step (loss and gradients) and the
prepared inference model agree with eager, and --compile refuses what inductor gets wrong.
CPU, fp32, small models, one thread (compiling is the slow part)."""
import pytest
import torch

from conftest import SAMPLE, Log
from vaekit.compiling import Compiled, for_inference, for_training, log_weights
from vaekit.config import TrainConfig
from vaekit.data import load_splits, preprocess
from vaekit.distributed import setup
from vaekit.errors import ConfigError
from vaekit.models import ModelConfig, build_model
from vaekit.models.inference import prepare_for_inference

FAMILIES = {
    "conv": ModelConfig(latent_dim=4),
    "resnet": ModelConfig(family="resnet", latent_dim=4),
    "ladder-vamp": ModelConfig(family="ladder", latent_dim=4, prior="vamp", pseudo_inputs=8),
    "spatial": ModelConfig(family="spatial", latent_dim=4, hidden_channels=16, res_blocks=1, latent_groups=1),
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch.set_num_threads(threads)


def images(n: int) -> torch.Tensor:
    x = preprocess(load_splits("mnist", SAMPLE).train.images[:n], "static")       # [n,1,28,28] in {0, 1}
    return x.contiguous(memory_format=torch.channels_last)


def model_of(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(FAMILIES[family]).to(memory_format=torch.channels_last)
    for p in model.parameters():      # resnet's blocks start as the identity: every layer given a gradient
        p.data.add_(torch.randn_like(p), alpha=0.02)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_training_step_matches_eager(family):
    model, x, rt = model_of(family).train(), images(8), setup("cpu", "fp32")
    eps = torch.randn(8, model.noise_dim)
    log = Log()
    results = []
    for stepped in (model, for_training(model, "on", rt, log)):
        model.zero_grad()
        with rt.autocast():
            loss = -stepped(x, eps=eps).log_w.mean()
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    for eager, compiled in zip(eager_grads, compiled_grads):
        assert eager.norm() > 0
        assert torch.allclose(compiled, eager, rtol=1e-3, atol=1e-4 * eager.abs().max().item())
    assert log.has("torch.compile: the first call took")


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_prepared_model_matches_eager(family):
    """--compile on: the IWAE pass compiled whole (compiling.log_weights, what `vaekit eval` calls)
    and every network of the prepared model compiled (what sampling calls) agree with eager."""
    model, x, rt = model_of(family).eval(), images(6), setup("cpu", "fp32")
    prepared = prepare_for_inference(model, rt)
    compiled = for_inference(prepare_for_inference(model, rt), "on", rt.device)
    log = Log()
    with torch.inference_mode():
        eps = torch.randn(3, 6, model.noise_dim)                                        # 3 draws of 6 images
        weigh = log_weights(compiled, "on", rt.device, log, decodes=18)
        assert torch.allclose(weigh(x, eps, None), prepared(x, eps=eps).log_w, rtol=1e-5, atol=1e-3)
        assert log.has("torch.compile: the first call took") and not log.has("backward")
        z = torch.randn(5, model.noise_dim)
        assert torch.allclose(compiled.decode_prior(z), prepared.decode_prior(z), atol=1e-5)


def test_compile_auto_compiles_the_iwae_pass_of_the_families_where_it_measured_faster():
    rt = setup("cpu", "fp32")
    spatial, conv = (prepare_for_inference(model_of(f).eval(), rt) for f in ("spatial", "conv"))
    long, quick = 10 ** 7, 10 ** 4                 # K = 5000 over 2,000 images; a quick look
    assert isinstance(log_weights(spatial, "auto", rt.device, print, long), Compiled)
    assert log_weights(spatial, "auto", rt.device, print, quick) is None      # not worth a compile
    assert log_weights(conv, "auto", rt.device, print, long) is None          # eager: compiling measured slower
    assert log_weights(spatial, "off", rt.device, print, long) is None
    assert isinstance(log_weights(conv, "on", rt.device, print, quick), Compiled)


def test_whole_prepared_model_and_training_decode_compile():
    """What a user compiles by hand: the prepared model as one graph (its first convolution takes
    one channel, where oneDNN's fake kernel gave the wrong strides) and the training model's
    decode (vaekit's transposed convolution with a fused ReLU, whose fake wanted packed weights)."""
    model, x, rt = model_of("conv").eval(), images(4), setup("cpu", "fp32")
    prepared = prepare_for_inference(model, rt)
    z = torch.randn(4, model.latent_dim)
    with torch.no_grad():
        eps = torch.randn(2, 4, model.noise_dim)
        assert torch.allclose(torch.compile(prepared)(x, eps=eps).log_w, prepared(x, eps=eps).log_w, atol=1e-3)
        assert torch.allclose(torch.compile(model.decode)(z), model.decode(z), atol=1e-5)


def test_compile_refuses_resnet_bf16_training():
    """Inductor (torch 2.13) gives some of the resnet decoder's gradients as exactly zero in bf16."""
    model, log = model_of("resnet"), Log()
    with pytest.raises(ConfigError, match="--compile off"):
        for_training(model, "on", setup("cpu", "bf16"), log)
    assert for_training(model, "auto", setup("cpu", "bf16"), log) is model        # auto: eager (off on CPU)
    assert for_training(model, "off", setup("cpu", "fp32"), log) is model


def test_compile_setting_is_checked():
    with pytest.raises(ConfigError, match="compile"):
        TrainConfig(compile="yes")
