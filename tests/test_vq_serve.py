"""The web demo over a vq run: samples are the code prior's decodes (refused in one line before
the prior exists), interpolation and inpainting run, the continuous-z panels are refused."""
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the demo extra is not installed: pip install -e '.[test,demo]'")

from test_serve import grid, ok, pixels, post, running  # noqa: E402
from test_vq_train import quiet, vq_config  # noqa: E402
from vaekit import train, train_prior  # noqa: E402
from vaekit.generate import code_prior_samples  # noqa: E402
from vaekit.serve import load  # noqa: E402


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    return train(vq_config(epochs=1), out=tmp_path_factory.mktemp("vq-serve") / "run", log=quiet).path


def test_a_vq_demo_without_a_prior_says_how_to_train_it(vq_run):
    with running(load(vq_run, "cpu")) as url:
        status, answer = post(url, "/api/sample", {"n": 4, "seed": 0})
        assert status == 422 and "vaekit train-prior" in answer["error"] and "\n" not in answer["error"]
        assert set(ok(url, "/api/interpolate", {"a": 0, "b": 1, "steps": 4})) == {"image", "frames"}


def test_a_vq_demo_samples_the_prior_and_refuses_the_latent_panels(vq_run):
    train_prior(vq_run, epochs=1, log=quiet)
    demo = load(vq_run, "cpu")
    with running(demo) as url:
        sample = ok(url, "/api/sample", {"n": 4, "seed": 3})
        expected = code_prior_samples(demo.model, demo.prior, 4, demo.runtime.generator(3))
        assert np.array_equal(pixels(sample["image"]), grid(expected, padding=1))
        for path, body in (("/api/latent", {"index": 0}), ("/api/map-decode", {"x": 0, "y": 0})):
            status, answer = post(url, path, body)
            assert status == 422 and "codes are discrete" in answer["error"], answer
        filled = ok(url, "/api/inpaint", {"index": 0, "mask": "bottom", "chains": 4})
        original, image = pixels(filled["original"]), pixels(filled["image"])
        assert np.array_equal(original[:14], image[:14])        # the observed top half is kept
