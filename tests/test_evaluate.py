"""`vaekit eval` on a model trained briefly on the shipped MNIST sample: the IWAE bound against the
ELBO, exact sums over every test image, reproducible dynamic binarization, the CLI end to end."""
import json
import math
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from vaekit import api, evaluate, runs

from conftest import SAMPLE, sample_config
from test_cli import vaekit
from vaekit import load_model, load_splits, train
from vaekit.api import eval_to_json
from vaekit.cli import main
from vaekit.cpu import usable_cores
from vaekit.data import preprocess
from vaekit.evaluate import elbo_per_image, elbo_report, eval_table, iwae_bounds
from vaekit.errors import Interrupted, RunError
from vaekit.objectives import analytic_kl
from vaekit.runs import PartialEval, Run, read_bounds
from vaekit.evaluate import fastest_decode_batch, max_decodes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = sample_config(epochs=5, lr=1e-3, batch_size=32)
    return train(config, out=tmp_path_factory.mktemp("eval") / "run", log=lambda *_: None).path


@pytest.fixture(scope="module")
def model_and_test(run):
    model, config, rt = load_model(run, "cpu")
    return model, rt, load_splits("mnist", config.data.data_dir).test.images


def test_iwae_bound_is_above_the_elbo_and_rises_with_k(model_and_test):
    model, rt, images = model_and_test
    x = preprocess(images[:200], "static")
    elbo = elbo_report(model, x, "static", rt, rt.generator(0))
    bounds = {k: iwae_bounds(model, x, k, seed=1).double().mean().item() for k in (1, 5, 50)}
    assert abs(bounds[1] - elbo["elbo_analytic_kl"]) < 2      # K = 1 is the ELBO, up to sampling noise
    assert elbo["elbo_analytic_kl"] < bounds[5] < bounds[50], (elbo, bounds)
    assert bounds[50] - bounds[1] > 1                           # a real gain, not noise


def test_the_elbo_scores_every_image_once_whatever_the_batch(model_and_test):
    """Batches of 3 over 7 images, the last of 1: each image's rate is its closed-form KL, so the
    mean rate is that of all 7 (a dropped or doubled last image moves it), and every column has a
    row per image."""
    model, rt, images = model_and_test
    x = preprocess(images[:7], "static")
    with torch.inference_mode():
        kl = analytic_kl(*model.encode(x)).double()                                   # [7], one pass
    terms = elbo_per_image(model, x, rt.generator(0), batch_size=3)
    assert terms.shape == (7, 3)
    torch.testing.assert_close(terms[:, 2], kl, atol=1e-4, rtol=0)
    elbo = elbo_report(model, x, "static", rt, rt.generator(0), batch_size=3)
    assert elbo["n"] == 7 and elbo["rate"] == pytest.approx(kl.mean().item(), abs=1e-4)
    assert elbo["elbo"] == pytest.approx(terms[:, 0].mean().item(), abs=1e-9)        # the same draws, again


def reference_bounds(model, x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The IWAE bound of each image written out in float64, one image at a time, from the draws
    the evaluation promises (image i's from the generator seeded with seed * 2**32 + i)."""
    bounds = []
    for i in range(len(x)):
        eps = torch.randn(k, model.latent_dim, generator=torch.Generator().manual_seed(seed * 2 ** 32 + i)).double()
        mean, logvar = (t.double() for t in model.encode(x[i:i + 1]))
        z = mean + torch.exp(logvar / 2) * eps                                       # [K,D]
        logits = model.decode(z.float()).double().flatten(1)                         # [K,784]
        xi = x[i].double().flatten()
        log_px = (xi * logits - torch.nn.functional.softplus(logits)).sum(1)
        log_pz = (-0.5 * (z ** 2 + math.log(2 * math.pi))).sum(1)
        log_qz = (-0.5 * (eps ** 2 + logvar + math.log(2 * math.pi))).sum(1)
        bounds.append(torch.logsumexp(log_px + log_pz - log_qz, 0) - math.log(k))
    return torch.stack(bounds)


@pytest.mark.parametrize("decode_batch", [3, 20, 49, 2000])
def test_iwae_bounds_are_the_same_draws_whatever_the_chunking(model_and_test, decode_batch):
    """Passes of 1 image in chunks of 3 + 3 + 1 draws, of 2 images with a ragged last pass of 1, of
    all 7: each image's bound equals the float64 reference with the same draws (a dropped or
    doubled chunk moves a bound by whole nats)."""
    model, rt, images = model_and_test
    x = preprocess(images[:7], "static")
    with torch.inference_mode():
        expected = reference_bounds(model, x, 7, seed=5)
    got = iwae_bounds(model, x, 7, seed=5, decode_batch=decode_batch)
    assert got.shape == (7,)
    torch.testing.assert_close(got.double(), expected, atol=2e-4, rtol=0)


def test_bf16_moves_the_iwae_bound_by_less_than_005_nats(run):
    """The same images, the same draws, decoded in bf16 (emulated where the CPU lacks it) and fp32."""
    x = preprocess(load_splits("mnist", SAMPLE).test.images[:20], "static")
    bounds = {}
    for precision in ("fp32", "bf16"):
        model, _, rt = load_model(run, "cpu", precision)
        assert rt.precision == precision
        bounds[precision] = iwae_bounds(model, x, 50, seed=0).double().mean().item()
    assert abs(bounds["bf16"] - bounds["fp32"]) < 0.05, bounds


def test_eval_json_holds_each_protocol_and_dynamic_is_reproducible(run):
    static = eval_to_json(run, k=4, device="cpu")
    dynamic = eval_to_json(run, k=4, binarization="dynamic", seed=3, device="cpu")
    again = eval_to_json(run, k=4, binarization="dynamic", seed=3, device="cpu")
    timing = {"seconds", "decodes_per_second"}
    assert {k: v for k, v in dynamic.items() if k not in timing} == {k: v for k, v in again.items() if k not in timing}
    saved = json.loads((run / "eval.json").read_text())
    precision = static["precision"]
    assert set(saved) == {f"static_k4_n500_seed0_{precision}", f"dynamic_k4_n500_seed3_{precision}"}
    assert saved[f"static_k4_n500_seed0_{precision}"]["elbo"] == static["elbo"]
    assert "the seed" in saved[f"static_k4_n500_seed0_{precision}"]["protocol"]
    assert "seed 3" in saved[f"dynamic_k4_n500_seed3_{precision}"]["protocol"]
    for r in (static, dynamic):
        assert r["n"] == 500                                    # the whole sample test set
        assert r["iwae_bound"] >= r["elbo_analytic_kl"] - 1
        assert r["nll_upper_bound"] == -r["iwae_bound"]
        assert 0 < r["active_units"] <= r["latent_dim"] == 50
        assert math.isclose(sum(r["rate_per_dim"]), r["rate"], abs_tol=0.01)   # the rate, dimension by dimension


def test_eval_json_keeps_each_k_beside_the_others_and_rekeys_an_older_vaekits_entries(run):
    def measured(record):
        return {k: v for k, v in record.items() if k not in ("seconds", "decodes_per_second")}

    k3 = eval_to_json(run, k=3, n=50, device="cpu", precision="fp32")
    path = run / "eval.json"
    path.write_text(json.dumps({"static_n50": k3, "by hand": {"note": 1}}))   # keys of a vaekit before K was one
    k2 = eval_to_json(run, k=2, n=50, device="cpu", precision="fp32")
    saved = json.loads(path.read_text())
    assert saved == {"static_k3_n50_seed0_fp32": k3, "by hand": {"note": 1}, "static_k2_n50_seed0_fp32": k2}   # another K: beside it
    again = eval_to_json(run, k=3, n=50, device="cpu", precision="fp32")      # the same protocol: replaced
    saved = json.loads(path.read_text())
    assert set(saved) == {"static_k3_n50_seed0_fp32", "by hand", "static_k2_n50_seed0_fp32"}
    assert saved["static_k3_n50_seed0_fp32"] == again
    assert measured(again) == measured(k3) and saved["static_k2_n50_seed0_fp32"] == k2
    assert not [p.name for p in run.iterdir() if p.name.startswith(".eval.json")]   # no temporary file left


def test_cli_eval_prints_a_table_with_the_protocol_beside_each_number(run):
    out = vaekit("eval", run, "--k", "3", "--device", "cpu").stdout
    rows = [line for line in out.splitlines() if line.endswith("  static")]
    assert all("±" in row for row in rows[:-1])                   # every mean with its standard error
    assert "decodes/s" in out.splitlines()[0]
    assert [row.strip().split("  ")[0] for row in rows] == [
        "test ELBO, single-sample (the seed's)", "test ELBO, analytic KL", "distortion", "rate", "IWAE bound, K=3",
        "NLL <= -IWAE bound, K=3", "active units (Cov > 0.01)"]
    assert "NLL <= -IWAE bound, K=3" in out and (run / "eval.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--k", "0"], "--k must be at least 1"),
    (["--binarization", "fuzzy"], "--binarization must be one of static, dynamic"),
    (["--decode-batch", "0"], "--decode-batch must be at least 1"),
    (["--n", "0"], "--n must be at least 1"),
    (["--n", "501"], "--n 501 is more than the 500 test images"),
    (["--max-memory", "0"], "--max-memory must be a positive, finite number of MB"),
    (["--max-memory", "inf"], "--max-memory must be a positive, finite number of MB"),
    (["--k", "100000000000"], "over the memory cap: ask for --k"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--workers", "1000"], "--workers 1000 is more than the"),
])
def test_bad_eval_input_gets_one_line(run, capsys, args, message):
    assert main(["eval", str(run), "--device", "cpu", *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: ")]   # the sample's
    assert len(err) == 1 and err[0].startswith("vaekit: error: ") and message in err[0]


def test_a_quick_estimate_states_its_standard_error_and_keeps_the_full_result(run):
    full = eval_to_json(run, k=5, device="cpu", precision="fp32")
    quick = eval_to_json(run, k=5, n=100, device="cpu", precision="fp32")
    assert quick["n"] == 100 and full["n"] == 500
    for name in ("elbo", "elbo_analytic_kl", "distortion", "rate", "iwae_bound"):
        se = quick[f"{name}_stderr"]
        assert 0 < se < 10 and full[f"{name}_stderr"] < se     # five times the images, a smaller error
        assert abs(quick[name] - full[name]) < 6 * se, name     # the quick estimate is near the full one
    saved = json.loads((run / "eval.json").read_text())
    assert saved["static_k5_n500_seed0_fp32"]["n"] == 500 and saved["static_k5_n100_seed0_fp32"]["n"] == 100
    for record in (quick, full):
        assert record["precision"] == "fp32" and record["decodes"] == record["n"] * 6
        assert record["decodes_per_second"] > 0 and record["seconds"] >= 0 and record["decode_batch"] >= 1


def test_the_decode_batch_changes_the_time_not_the_numbers(run):
    """A memory cap that allows a handful of decodes at once gives the very same bound."""
    roomy = eval_to_json(run, k=6, n=30, device="cpu", precision="fp32")
    tight = eval_to_json(run, k=6, n=30, device="cpu", precision="fp32", max_memory_mb=2)
    model, _, _ = load_model(run, "cpu", "fp32")
    assert tight["decode_batch"] == max_decodes(model, torch.device("cpu"), 2) < 10 < roomy["decode_batch"]
    assert tight["iwae_bound"] == pytest.approx(roomy["iwae_bound"], abs=1e-4)


def test_decode_batch_tuning_stays_under_the_cap(run):
    model, _, _ = load_model(run, "cpu", "fp32")
    assert 1 <= fastest_decode_batch(model, torch.device("cpu"), cap=300) <= 300
    assert max_decodes(model, torch.device("cpu"), 1024) > max_decodes(model, torch.device("cpu"), 512) > 100


def test_elbo_report_runs_a_training_model_in_the_runtimes_precision(run):
    """The one precision rule (evaluate.py): a training model is run under the runtime's autocast,
    a prepared one as it is, so both give the bf16 ELBO; the runtime's precision is what changes it."""
    from vaekit.distributed import setup
    from vaekit.models.inference import prepare_for_inference

    x = preprocess(load_splits("mnist", SAMPLE).test.images[:100], "static")
    plain, _, bf16 = load_model(run, "cpu", "bf16", prepared=False)
    fp32 = setup("cpu", "fp32")
    prepared = prepare_for_inference(plain, bf16)
    elbo = {name: elbo_report(model, x, "static", rt, rt.generator(0))["elbo"]
            for name, model, rt in (("training", plain, bf16), ("prepared", prepared, bf16), ("fp32", plain, fp32))}
    assert elbo["training"] == pytest.approx(elbo["prepared"], abs=1e-3)
    assert elbo["fp32"] != elbo["training"] and elbo["fp32"] == pytest.approx(elbo["training"], abs=0.5)


def test_seeds_are_checked_once_and_the_largest_one_runs_every_derivation(model_and_test):
    """config.check_seed takes 0..SEED_LIMIT and refuses the rest in one line; evaluation's draws
    from the largest (likelihood_report seeds the bound with seed + 1) are drawn, not an overflow."""
    from vaekit.config import SEED_LIMIT, TrainConfig, check_seed
    from vaekit.errors import ConfigError

    assert check_seed(SEED_LIMIT) == SEED_LIMIT and check_seed(0) == 0
    for bad in (-1, SEED_LIMIT + 1, 2 ** 64, 1e16, True):
        with pytest.raises(ConfigError, match=f"^--seed must be an integer from 0 to {SEED_LIMIT}; got "):
            check_seed(bad)
    with pytest.raises(ConfigError, match="--seed must be"):
        TrainConfig(seed=2 ** 40)
    model, _, images = model_and_test
    bounds = iwae_bounds(model, preprocess(images[:2], "static"), 3, seed=SEED_LIMIT + 1)
    assert bounds.shape == (2,) and torch.isfinite(bounds).all()


def _stop_after(passes: int, stop, monkeypatch):
    """Makes evaluations stop, by calling `stop`, once `passes` passes' bounds are kept."""
    keep = PartialEval.add
    kept = []

    def add(self, bounds):
        keep(self, bounds)
        kept.append(len(bounds))
        if len(kept) == passes:
            stop()
    monkeypatch.setattr(PartialEval, "add", add)
    return keep


def _ctrl_c():
    raise KeyboardInterrupt


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)     # a real signal to this process: PartialEval's handler stops it


def _not_in_the_parent(*args, **kwargs):
    raise AssertionError("with --workers 2 the workers score every pass, not the parent")


@pytest.mark.parametrize("stop, stopped_by, workers", [
    (_ctrl_c, KeyboardInterrupt, 1), (_sigterm, Interrupted, 1),
    pytest.param(_sigterm, Interrupted, 2, marks=pytest.mark.skipif(usable_cores() < 2, reason="needs two cores"))])
def test_a_stopped_evaluation_goes_on_where_it_stopped_and_ends_as_one_sitting_would(run, tmp_path, monkeypatch,
                                                                                      stop, stopped_by, workers):
    monkeypatch.setattr(api, "RESUMABLE_FROM", 0)             # every evaluation keeps its bounds
    monkeypatch.setattr(runs, "PARTIAL_SAVE_SECONDS", 1e9)    # saved only when stopped
    stopped, straight = (shutil.copytree(run, tmp_path / name, ignore=shutil.ignore_patterns("eval.json"))
                         for name in ("stopped", "straight"))                  # without the other tests' results
    protocol = dict(k=20, n=60, decode_batch=200, device="cpu", precision="fp32")   # 10 images a pass, 6 passes
    keep = _stop_after(3, stop, monkeypatch)
    if workers > 1:     # spawned workers import evaluate afresh: only a pass in this process would fail
        monkeypatch.setattr(evaluate, "iwae_bounds", _not_in_the_parent)
    said = []
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(stopped_by):
        eval_to_json(stopped, **protocol, workers=workers, log=said.append)
    assert signal.getsignal(signal.SIGTERM) == handler                # this process's own handler again
    saved = stopped / "eval-partial" / "static_k20_n60_seed0_fp32.safetensors"
    assert said == [f"stopped: the bounds of 30 images are kept in {saved}; the same command goes on from there"]
    assert load_file(saved)["bounds"].shape == (30,)                  # the three passes of ten images scored
    assert not (stopped / "eval.json").exists()
    monkeypatch.setattr(PartialEval, "add", keep)
    lines = []
    resumed = eval_to_json(stopped, **protocol, workers=workers, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("resuming: 30 images scored in") and "sitting 2" in lines[0]
    assert not saved.exists()                                         # eval.json holds the result now,
    assert read_bounds(stopped / "eval-bounds" / saved.name)[0].shape == (60,)   # and eval-bounds/ every bound
    monkeypatch.setattr(evaluate, "iwae_bounds", iwae_bounds)
    whole = eval_to_json(straight, **protocol)
    timing = {"seconds", "decodes_per_second", "sittings", "workers"}
    assert resumed["sittings"] == 2 and "sittings" not in whole
    if workers == 1:       # the same process: the same sums
        assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in whole.items() if k not in timing}
    else:                  # the same draws, each worker's single thread summing in its own order
        assert resumed["workers"] == 2 and "2 processes" in eval_table(resumed)
        assert resumed.keys() - timing == whole.keys() - timing
        assert read_bounds(stopped / "eval-bounds" / saved.name)[0] == pytest.approx(
            read_bounds(straight / "eval-bounds" / saved.name)[0], abs=1e-4)
    assert json.loads((stopped / "eval.json").read_text())["static_k20_n60_seed0_fp32"] == resumed


def test_a_finished_evaluation_states_its_difference_from_another_precision_on_the_same_images_and_draws(
        run, tmp_path, monkeypatch):
    monkeypatch.setattr(api, "RESUMABLE_FROM", 0)             # every evaluation keeps its bounds
    copy = shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("eval.json", "eval-bounds"))
    protocol = dict(k=20, decode_batch=200, device="cpu")
    fp32 = eval_to_json(copy, n=40, precision="fp32", **protocol)
    bf16 = eval_to_json(copy, n=60, precision="bf16", **protocol)
    kept_fp32, identity = read_bounds(copy / "eval-bounds" / "static_k20_n40_seed0_fp32.safetensors")
    kept_bf16, _ = read_bounds(copy / "eval-bounds" / "static_k20_n60_seed0_bf16.safetensors")
    assert identity["precision"] == "fp32" and kept_fp32.shape == (40,) and kept_bf16.shape == (60,)
    assert kept_fp32.mean().item() == pytest.approx(fp32["iwae_bound"], rel=1e-12) and "same_draws" not in fp32
    pair = bf16["same_draws"]["static_k20_n40_seed0_fp32"]                 # over the 40 images both scored
    assert pair["images"] == 40 and pair["difference"] == pytest.approx((kept_bf16[:40] - kept_fp32).mean().item())
    # the same draws: what differs is bf16's rounding, far smaller than the spread of the bounds over images
    assert pair["difference"] != 0 and pair["difference_stderr"] < 0.1 * fp32["iwae_bound_stderr"]
    assert "minus static_k20_n40_seed0_fp32's (first 40)" in eval_table(bf16)
    assert json.loads((copy / "eval.json").read_text())["static_k20_n60_seed0_bf16"]["same_draws"] == bf16["same_draws"]
    other_draws = eval_to_json(copy, n=40, precision="fp32", seed=1, **protocol)
    assert "same_draws" not in other_draws                          # another seed: other images and draws


def test_saved_bounds_are_taken_up_only_for_the_same_weights_and_one_evaluation_runs_at_a_time(tmp_path, monkeypatch):
    run = Run(tmp_path)
    identity = {"weights_sha256": "a" * 64}
    monkeypatch.setattr(runs, "PARTIAL_SAVE_SECONDS", 0.0)
    with PartialEval(run, "static_k5_n9_seed0_fp32", identity) as partial:
        with pytest.raises(RunError, match="another `vaekit eval` of this protocol is running"):
            PartialEval(run, "static_k5_n9_seed0_fp32", identity).__enter__()
        assert partial.resume() is None                               # nothing saved yet
        partial.add(torch.tensor([-80.5, -91.25]))                    # saved: the save interval has passed
    with PartialEval(run, "static_k5_n9_seed0_fp32", identity) as again:
        assert again.resume().startswith("resuming: 2 images scored")
        assert again.bounds.tolist() == [-80.5, -91.25] and again.sittings == 2
    other = PartialEval(run, "static_k5_n9_seed0_fp32", {"weights_sha256": "b" * 64})
    assert "other weights or data" in other.resume() and len(other.bounds) == 0
    partial.path.write_bytes(b"half a file")                          # a damaged file: started over
    assert "unreadable" in other.resume()
