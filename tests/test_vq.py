"""The VQ-VAE family and its code prior: the straight-through gradient, the codebook's EMA and
restarts, float32 codes under autocast, the prior's causality and sampling, inpainting's kept
codes, the two-stage bound against float64, bit-exact resume of both stages, and a short real
training on the MNIST sample."""
import math

import pytest
import torch
from safetensors.torch import load, save

from conftest import SAMPLE
from vaekit.data import load_splits, preprocess
from vaekit.errors import ConfigError
from vaekit.models.code_prior import CodePrior, PriorConfig, inpaint_codes, prior_train_step, vq_log_likelihood
from vaekit.models import ModelConfig
from vaekit.models.vq_vae import EMA_EPSILON, VQVAE, codebook_usage, perplexity, vq_train_step

TINY = {"codebook_size": 16, "code_dim": 4, "hidden_channels": 8, "res_blocks": 1}
TINY_PRIOR = {"width": 16, "layers": 2, "heads": 2}


def tiny_vq(seed: int = 0, **changes) -> VQVAE:
    torch.manual_seed(seed)
    return VQVAE(ModelConfig(family="vq", **{**TINY, **changes}))


def tiny_prior(vq: VQVAE, seed: int = 0) -> CodePrior:
    torch.manual_seed(seed)
    return CodePrior(PriorConfig.for_model(vq, **TINY_PRIOR))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread runs them faster than several, and far faster on a
    machine whose cores are busy (where a step waits for every thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """The sample's first 512 training images, binarized as the seed does: [512,1,28,28]."""
    return preprocess(load_splits("mnist", SAMPLE, log=lambda _: None).train.images[:512], "static")


def test_shapes_and_config_errors(images):
    vq = tiny_vq()
    terms = vq(images[:5])
    assert terms.params.shape == (5, 1, 28, 28) and terms.indices.shape == (5, 7, 7)
    assert terms.z_e.shape == (5, 4, 7, 7) and terms.distortion.shape == terms.commitment.shape == (5,)
    assert terms.indices.dtype == torch.int64 and int(terms.indices.max()) < 16
    assert vq.decode_indices(terms.indices, as_image=True).shape == (5, 1, 28, 28)
    assert torch.equal(vq.codes(images[:5], batch_size=2), terms.indices)
    with pytest.raises(ConfigError, match="multiple of 4"):
        ModelConfig(family="vq", image_size=30)
    with pytest.raises(ConfigError, match="divide"):
        PriorConfig(width=10, heads=3)


def test_straight_through_gradient():
    """The decoder's gradient w.r.t. z_q reaches z_e unchanged, and the commitment adds
    2 beta (z_e - z_q)."""
    vq = tiny_vq()
    z_e = torch.randn(3, 4, 7, 7, requires_grad=True)
    quantized = vq.quantize(z_e)
    (through,) = torch.autograd.grad(vq.decoder(quantized.z_q).square().sum(), z_e)
    z_q = vq.lookup(quantized.indices).clone().requires_grad_()
    (direct,) = torch.autograd.grad(vq.decoder(z_q).square().sum(), z_q)
    assert torch.equal(quantized.z_q, z_q)       # the forward value is the codebook's
    assert torch.allclose(through, direct, atol=1e-6) and through.abs().sum() > 0
    (commit,) = torch.autograd.grad(quantized.commitment.sum(), z_e)
    assert torch.allclose(commit, 2 * 0.25 * (z_e - z_q).detach(), atol=1e-6)


def test_nearest_code_and_statistics_against_loops():
    vq = tiny_vq()
    z = torch.randn(50, 4)
    indices = vq.codebook.nearest(z)
    e = vq.codebook.embedding
    for row, k in zip(z, indices):
        assert int(k) == min(range(16), key=lambda j: float(((row - e[j]) ** 2).sum()))
    counts, sums = vq.codebook.batch_statistics(z, indices)
    for k in range(16):
        chosen = z[indices == k]
        assert counts[k] == len(chosen) and torch.allclose(sums[k], chosen.sum(0), atol=1e-5)


def test_nearest_code_stays_float32_under_autocast():
    """A bf16 distance matrix picks another code for 29 of these 4,000 vectors (measured); the
    codebook's stays float32 and agrees with float64 distances."""
    vq = tiny_vq(code_dim=16, codebook_size=64)
    z = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0)) * 3
    exact = torch.cdist(z.double(), vq.codebook.embedding.double()).argmin(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(vq.codebook.nearest(z), exact)


def test_ema_update_against_a_direct_computation():
    """Two EMA steps, with no code dead, against the recipe written out in float64 per code."""
    vq = tiny_vq(dead_after=1000, ema_decay=0.9)
    book = vq.codebook
    book.unused_steps.zero_()
    size = book.cluster_size.double().clone()
    total = book.embed_sum.double().clone()
    for step in range(2):
        z = torch.randn(40, 4) + step
        counts, sums = book.batch_statistics(z, book.nearest(z))
        assert len(book.update(counts, sums)) == 0
        expected = torch.empty(16, 4, dtype=torch.float64)
        for k in range(16):
            size[k] = 0.9 * size[k] + 0.1 * float(counts[k])
            total[k] = 0.9 * total[k] + 0.1 * sums[k].double()
        n = float(size.sum())
        for k in range(16):
            expected[k] = total[k] / ((float(size[k]) + EMA_EPSILON) / (n + 16 * EMA_EPSILON) * n)
        assert torch.allclose(book.cluster_size.double(), size, rtol=1e-6)
        assert torch.allclose(book.embedding.double(), expected, rtol=1e-5, atol=1e-6)
    assert int(book.epoch_counts.sum()) == 80 and perplexity(book.epoch_counts) > 1


def test_dead_codes_restart_at_encoder_outputs(images):
    vq = tiny_vq(dead_after=3)
    optimizer = torch.optim.Adam(vq.parameters(), 1e-3)
    generator = torch.Generator().manual_seed(1)
    vq_train_step(vq, optimizer, images[:32], generator)     # every code starts dead: the first step restarts them
    book = vq.codebook
    assert int(book.unused_steps.max()) == 0 and int(book.epoch_restarts) > 0
    dead = torch.tensor([2, 5, 11])
    book.embedding[dead] = 1e4                   # far from every encoder output: chosen by none
    book.unused_steps.zero_()
    book.unused_steps[dead] = 2                  # one more unused step and they are dead
    book.start_epoch()
    x = images[32:64]
    candidates = vq.encode(x).detach().permute(0, 2, 3, 1).reshape(-1, 4)   # the step's z_e, before its update
    result = vq_train_step(vq, optimizer, x, generator)
    assert result["restarted"] == 3 and codebook_usage(vq)["restarts"] == 3
    for k in dead:
        assert (book.embedding[k] == candidates).all(1).any(), "a restarted code is one of the batch's outputs"
        assert book.cluster_size[k] == 1 and book.unused_steps[k] == 0
    alive = torch.ones(16, dtype=torch.bool)
    alive[dead] = False
    assert (book.embedding[alive].abs() < 1e3).all()


def test_prior_is_exactly_causal():
    """Changing the code at position i changes no logit at positions <= i (those of p(c_j | c_<j),
    j <= i), and changes the next position's."""
    vq = tiny_vq(image_size=16)                   # a 4x4 grid: every position is tried
    prior = tiny_prior(vq)
    codes = torch.randint(16, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    base = prior.logits(codes).view(2, 16, 16)
    for i in range(16):
        changed = codes.clone().view(2, 16)
        changed[:, i] = (changed[:, i] + 1) % 16
        logits = prior.logits(changed.view(2, 4, 4)).view(2, 16, 16)
        assert torch.equal(logits[:, :i + 1], base[:, :i + 1]), f"position {i} leaks backwards"
        if i < 15:
            assert not torch.allclose(logits[:, i + 1], base[:, i + 1])


def test_sampling_follows_the_prior_and_keeps_known_codes():
    vq = tiny_vq(image_size=16)
    prior = tiny_prior(vq)
    draw = prior.sample(3, torch.Generator().manual_seed(4))
    assert draw.shape == (3, 4, 4) and torch.equal(draw, prior.sample(3, torch.Generator().manual_seed(4)))
    # near-zero temperature: the greedy sequence, built here a position at a time from the logits
    greedy = torch.zeros(1, 16, dtype=torch.long)
    for i in range(16):
        greedy[0, i] = prior.logits(greedy.view(1, 4, 4)).view(1, 16, 16)[0, i].argmax()
    cold = prior.sample(1, torch.Generator().manual_seed(0), temperature=1e-6)
    assert torch.equal(cold.view(1, 16), greedy)
    given = torch.randint(16, (3, 4, 4))
    known = torch.zeros(3, 4, 4, dtype=torch.bool)
    known[:, :2] = True                           # the top half known: its codes are kept
    filled = prior.sample(3, torch.Generator().manual_seed(5), given=given, known=known)
    assert torch.equal(filled[:, :2], given[:, :2])
    with pytest.raises(ConfigError, match="temperature"):
        prior.sample(1, temperature=0)


def test_two_stage_likelihood_against_float64_reference(images):
    """log p(x | c(x)) + log p(c(x)), with the codes found by explicit distances, the Bernoulli
    log-likelihood written out, and each p(c_i | c_<i) from a pass that sees only c_<i (every
    later code replaced by noise), all in float64."""
    vq = tiny_vq(image_size=28)
    prior = tiny_prior(vq)
    x = images[:4]
    bound = vq_log_likelihood(vq, prior, x, batch_size=3)
    vq64, prior64 = tiny_vq(image_size=28).double(), tiny_prior(vq).double()
    vq64.load_state_dict(vq.state_dict())
    prior64.load_state_dict(prior.state_dict())
    with torch.no_grad():
        z = vq64.encoder(x.double()).permute(0, 2, 3, 1)                        # [4,7,7,D]
        codes = torch.cdist(z.reshape(-1, 4), vq64.codebook.embedding).argmin(1).view(4, 7, 7)
        p = torch.sigmoid(vq64.decoder(vq64.codebook.embedding[codes].permute(0, 3, 1, 2)))
        log_px = (x * torch.log(p) + (1 - x) * torch.log1p(-p)).flatten(1).sum(1)
        noise = torch.Generator().manual_seed(9)
        log_pc = torch.zeros(4, dtype=torch.float64)
        flat = codes.view(4, 49)
        for i in range(49):
            seen = torch.cat([flat[:, :i], torch.randint(16, (4, 49 - i), generator=noise)], 1)
            logits = prior64.logits(seen.view(4, 7, 7)).view(4, 49, 16)[:, i].double()
            log_pc += torch.log_softmax(logits, -1).gather(1, flat[:, i:i + 1])[:, 0]
    assert torch.equal(vq.codes(x), codes)
    assert bound.dtype == torch.float64 and bound.shape == (4,)
    assert torch.allclose(bound, log_px + log_pc, rtol=1e-5, atol=1e-3)
    assert (log_pc < 0).all() and (bound < log_px).all()
    uniform = vq_log_likelihood(vq, None, x)                  # the first stage's own prior, uniform
    assert torch.allclose(uniform, log_px - 49 * math.log(16), rtol=1e-5, atol=1e-3)


def _state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> bytes:
    """What a checkpoint keeps, through the safetensors bytes a checkpoint is written in."""
    tensors = {f"model.{k}": v for k, v in module.state_dict().items()}
    tensors["rng"] = generator.get_state()
    opt = optimizer.state_dict()
    for i, s in opt["state"].items():
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in s.items()})
    return save(tensors)


def _restore(data: bytes, module: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator):
    tensors = load(data)
    module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    generator.set_state(tensors["rng"])
    opt = optimizer.state_dict()
    opt["state"] = {i: {k: tensors[f"opt.{i}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")}
                    for i in range(len(opt["param_groups"][0]["params"]))}
    optimizer.load_state_dict(opt)


def test_first_stage_resumes_bit_exact(images):
    vq = tiny_vq(dead_after=2)
    optimizer = torch.optim.Adam(vq.parameters(), 1e-3)
    generator = torch.Generator().manual_seed(3)
    batches = images[:192].split(32)
    for x in batches[:3]:
        vq_train_step(vq, optimizer, x, generator)
    saved = _state(vq, optimizer, generator)
    straight = [vq_train_step(vq, optimizer, x, generator) for x in batches[3:]]
    resumed_vq = tiny_vq(seed=7, dead_after=2)
    resumed_optimizer = torch.optim.Adam(resumed_vq.parameters(), 1e-3)
    resumed_generator = torch.Generator()
    _restore(saved, resumed_vq, resumed_optimizer, resumed_generator)
    again = [vq_train_step(resumed_vq, resumed_optimizer, x, resumed_generator) for x in batches[3:]]
    assert again == straight and sum(r["restarted"] for r in straight) > 0     # restarts were drawn after the save
    for (name, a), b in zip(vq.state_dict().items(), resumed_vq.state_dict().values()):
        assert torch.equal(a, b), name


def test_second_stage_resumes_bit_exact():
    vq = tiny_vq()
    prior = tiny_prior(vq)
    optimizer = torch.optim.Adam(prior.parameters(), 1e-3)
    order = torch.Generator().manual_seed(2)
    codes = torch.randint(16, (64, 7, 7), generator=torch.Generator().manual_seed(0))

    def steps(prior, optimizer, order, n):
        return [prior_train_step(prior, optimizer, codes[torch.randperm(64, generator=order)[:16]]) for _ in range(n)]

    steps(prior, optimizer, order, 2)
    saved = _state(prior, optimizer, order)
    straight = steps(prior, optimizer, order, 3)
    resumed = tiny_prior(vq, seed=5)
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), 1e-3)
    resumed_order = torch.Generator()
    _restore(saved, resumed, resumed_optimizer, resumed_order)
    assert steps(resumed, resumed_optimizer, resumed_order, 3) == straight
    for a, b in zip(prior.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_unknown_codes_are_the_receptive_field_of_the_hole():
    """A code is unknown exactly where changing the hidden pixels can change its z_e."""
    vq = tiny_vq(res_blocks=0, image_size=32).double()
    observed = torch.ones(1, 1, 32, 32, dtype=torch.bool)
    observed[..., 26:, 20:] = False
    unknown = vq.unknown_codes(observed)[0]                                    # [8,8]
    x = torch.rand(1, 1, 32, 32, dtype=torch.float64, requires_grad=True)
    reach = torch.zeros(8, 8, dtype=torch.bool)
    z = vq.encoder(x)[0]                                                        # [D,8,8]
    for i in range(8):
        for j in range(8):
            (g,) = torch.autograd.grad(z[:, i, j].square().sum(), x, retain_graph=True)
            reach[i, j] = bool(g[0, 0][~observed[0, 0]].abs().sum() > 0)
    assert torch.equal(unknown, reach) and 0 < int(unknown.sum()) < 64


def test_inpainting_keeps_the_codes_the_hole_does_not_reach(images):
    """Codes outside the hole's reach are the encoder's; with one proposal the draw is the
    prior's own conditional draw (the resampling has one candidate)."""
    vq = tiny_vq(res_blocks=0)
    prior = tiny_prior(vq)
    x = images[:3]
    observed = torch.ones(3, 1, 28, 28, dtype=torch.bool)
    observed[..., 22:, :] = False                  # the bottom rows hidden
    known = ~vq.unknown_codes(observed)
    assert known[:, :3].all() and not known[:, 3:].any()     # an 18-pixel field without res blocks
    codes = inpaint_codes(vq, prior, x, observed, torch.Generator().manual_seed(1), proposals=8)
    assert torch.equal(codes[known], vq.codes(x)[known])
    one = inpaint_codes(vq, prior, x, observed, torch.Generator().manual_seed(2), proposals=1)
    alone = prior.sample(3, torch.Generator().manual_seed(2), given=vq.codes(x * observed), known=known)
    assert torch.equal(one, alone)


def test_short_training_lowers_distortion_and_uses_codes(images):
    """100 first-stage steps on the MNIST sample, then 40 prior steps on the frozen codes."""
    torch.manual_seed(0)
    vq = VQVAE(ModelConfig(family="vq", codebook_size=32, code_dim=8, hidden_channels=16, res_blocks=1, dead_after=20))
    optimizer = torch.optim.Adam(vq.parameters(), 3e-3)
    generator = torch.Generator().manual_seed(0)
    order = torch.Generator().manual_seed(0)
    first = vq(images[:256]).distortion.mean().item()
    vq.codebook.start_epoch()
    for _ in range(100):
        vq_train_step(vq, optimizer, images[torch.randperm(len(images), generator=order)[:16]], generator)
    usage = codebook_usage(vq)
    vq.eval()
    after = vq(images[:256]).distortion.mean().item()
    assert after < 0.4 * first, (first, after)      # measured: 513 -> 140 nats
    assert usage["perplexity"] > 12 and usage["dead_codes"] < 8, usage    # measured: 19.8, 0
    codes = vq.codes(images)
    torch.manual_seed(0)
    prior = CodePrior(PriorConfig.for_model(vq, width=32, layers=1, heads=2))
    prior_optimizer = torch.optim.Adam(prior.parameters(), 1e-2)
    uniform = 49 * math.log(32)
    for _ in range(39):
        nll = prior_train_step(prior, prior_optimizer, codes[torch.randperm(len(codes), generator=order)[:32]])
    nll = prior_train_step(prior, prior_optimizer, codes[:32])        # the codes themselves, not a copy
    prior.eval()
    held = -vq_log_likelihood(vq, prior, images[:128]).mean().item()
    assert nll < 0.7 * uniform and held > after      # measured: 100 against 170 nats, (nll, uniform, held)


def test_vq_config_refuses_the_gaussian_families_settings():
    with pytest.raises(ConfigError, match="drop --conditional, --prior vamp"):
        ModelConfig(family="vq", conditional=True, prior="vamp")
    with pytest.raises(ConfigError, match="drop --beta"):
        ModelConfig(family="vq", beta=2.0)
    assert ModelConfig(family="vq").grid_size == 7
