"""The generation tools on a model trained briefly on the shipped MNIST sample: their real
properties, the files they write, and each CLI subcommand end to end."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import sample_config
from test_cli import vaekit
from vaekit import load_model, load_splits, train
from vaekit.cli import main
from vaekit.data import preprocess
from vaekit.api import traverse_to_png
from vaekit.errors import ConfigError
from vaekit.generate import (MASKS, PATHS, LatentPlane, apply_attribute, attribute_vector, inpaint,
                             inpainting_log_likelihood, inpainting_mask, interpolate, manifold, mean_image,
                             most_active_dims, region_mask, traverse)
from vaekit.viz import grid_image, scatter_image


def quiet(*_):
    pass


@torch.inference_mode()
def decode(model, z: torch.Tensor) -> torch.Tensor:
    return model.decode(z, as_image=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = sample_config(epochs=5, lr=1e-3, batch_size=32)    # 315 steps: enough for real digits
    return train(config, out=tmp_path_factory.mktemp("gen") / "run", log=quiet).path


@pytest.fixture(scope="module")
def loaded(run):
    model, config, rt = load_model(run, "cpu")
    return model, rt, load_splits("mnist", config.data.data_dir)


def test_interpolation_ends_are_the_reconstructions_of_the_ends(loaded):
    model, _, splits = loaded
    x = preprocess(splits.test.images[[0, 1]], "static")
    ends = decode(model, model.posterior(x)[0])
    for path in PATHS:
        line = interpolate(model, x, steps=6, path=path)
        assert line.shape == (6, 1, 28, 28)
        torch.testing.assert_close(line[[0, -1]], ends, atol=1e-5, rtol=0)
        assert (line[3] - ends).abs().amax(dim=(1, 2, 3)).min() > 0.05     # the middle is neither end


def test_traversal_changes_only_the_chosen_dimension(loaded):
    model, _, splits = loaded
    x = preprocess(splits.test.images[:1], "static")
    code = model.posterior(x)[0][0]
    values = torch.linspace(-3, 3, 5)
    z, images = traverse(model, x, [4, 17], values)
    assert z.shape == (2, 5, 50) and images.shape == (2, 5, 1, 28, 28)
    for row, dim in enumerate([4, 17]):
        changed = (z[row] != code).any(dim=0)
        assert changed.nonzero().flatten().tolist() == [dim]
        assert torch.equal(z[row, :, dim], values)
    torch.testing.assert_close(images, decode(model, z.flatten(0, 1)).view_as(images))


def test_attribute_vector_moves_codes_toward_the_target_class(loaded):
    model, _, splits = loaded
    codes = model.posterior(preprocess(splits.train.images, "static"))[0]
    labels = splits.train.labels
    vector = attribute_vector(codes, labels, to=8, from_=3)
    torch.testing.assert_close(vector, codes[labels == 8].mean(0) - codes[labels == 3].mean(0))
    threes = preprocess(splits.test.images[splits.test.labels == 3][:20], "static")
    morphs = apply_attribute(model, model.posterior(threes)[0], vector, torch.tensor([0.0, 1.0]))
    # re-encoded, the morphed images sit nearer the 8s' mean code than the 3s'
    again = model.posterior((morphs[:, 1] > 0.5).float())[0]
    to_8 = (again - codes[labels == 8].mean(0)).norm(dim=1).mean()
    to_3 = (again - codes[labels == 3].mean(0)).norm(dim=1).mean()
    assert to_8 < to_3
    torch.testing.assert_close(morphs[:, 0], decode(model, model.posterior(threes)[0]))
    others = attribute_vector(codes, labels, to=8)       # against all other labels
    torch.testing.assert_close(others, codes[labels == 8].mean(0) - codes[labels != 8].mean(0))


def test_a_mask_from_a_picture_marks_its_white_pixels_and_refuses_an_empty_or_misfit_one():
    picture = Image.new("L", (28, 28))
    picture.paste(255, (4, 14, 24, 24))                     # white = missing: 20 x 10 pixels
    mask = inpainting_mask(picture, (1, 28, 28))
    assert mask.shape == (1, 28, 28) and mask.sum() == 200 and mask[0, 14:24, 4:24].all()
    assert torch.equal(inpainting_mask("top", (3, 28, 28)), region_mask("top", (3, 28, 28)))
    assert inpainting_mask(picture.convert("RGB"), (3, 28, 28)).sum() == 3 * 200   # every channel of a pixel
    with pytest.raises(ConfigError, match="marks no pixel"):
        inpainting_mask(Image.new("L", (28, 28)), (1, 28, 28))
    with pytest.raises(ConfigError, match="is 8x8; the images are 28x28"):
        inpainting_mask(Image.new("L", (8, 8), 255), (1, 28, 28))


def test_region_masks_cover_the_named_region():
    masks = {name: region_mask(name, (1, 28, 28)) for name in MASKS}
    assert all(m.sum() == 14 * 28 for name, m in masks.items() if name != "centre")
    assert masks["top"][0, :14].all() and masks["left"][0, :, :14].all() and masks["centre"].sum() == 14 * 14
    assert torch.equal(masks["top"] | masks["bottom"], torch.ones(1, 28, 28, dtype=torch.bool))


@pytest.mark.parametrize("method", ["pseudo-gibbs", "metropolis"])
@pytest.mark.parametrize("binarization", ["static", "dynamic"])
def test_inpainting_keeps_observed_pixels(loaded, method, binarization):
    """The observed pixels of the completion are those of the x given, whichever draw made it."""
    model, rt, splits = loaded
    mask = region_mask("top", (1, 28, 28))
    x = preprocess(splits.test.images[:6], binarization, rt.generator(1))
    filled, logits = inpaint(model, x, mask, steps=4, chains=2, method=method, generator=rt.generator(0))
    assert torch.equal(filled[:, ~mask], x[:, ~mask])
    assert filled.shape == logits.shape == (6, 1, 28, 28) and 0 <= filled.min() and filled.max() <= 1
    assert (filled[:, mask] - 0.5).abs().mean() > 0.2        # decided pixels, not a grey fill


def test_inpainting_beats_the_mean_image(loaded):
    model, rt, splits = loaded
    start = mean_image(preprocess(splits.train.images, "static"))
    x, mask = preprocess(splits.test.images[:100], "static"), region_mask("bottom", (1, 28, 28))
    scores = inpainting_log_likelihood(model, x, mask, start, rt.generator(0), steps=20, chains=4,
                                       method="pseudo-gibbs")
    assert scores["n"] == 100 and scores["masked_pixels"] == 392
    assert scores["gain"] > 8, scores          # nats per image (11.8 here, on a baseline of -104)
    # standard errors over the 100 images: the gain is many of them away from 0
    assert 0 < scores["gain_stderr"] < scores["gain"] / 4 and scores["inpainting_stderr"] > 0, scores
    # passes of 3 images (12 decodes / 4 chains), the last of 1: the baseline, which draws nothing, is
    # the same mean over the same 100 images (a dropped or doubled last image moves it)
    ragged = inpainting_log_likelihood(model, x, mask, start, rt.generator(0), steps=1, chains=4,
                                       method="pseudo-gibbs", batch_size=12)
    assert ragged["n"] == 100
    assert ragged["mean_image_baseline"] == pytest.approx(scores["mean_image_baseline"], abs=1e-9)
    assert ragged["mean_image_baseline_stderr"] == pytest.approx(scores["mean_image_baseline_stderr"], abs=1e-9)


def test_latent_maps(loaded):
    model, _, splits = loaded
    codes = model.posterior(preprocess(splits.test.images, "static"))[0]
    plane = LatentPlane.of(codes)
    coords = plane.project(codes)
    assert coords.shape == (500, 2) and plane.names[0].startswith("PC1")
    assert coords[:, 0].var() >= coords[:, 1].var() and abs(coords.mean(0)).max() < 1e-3
    on_plane = plane.code(coords)                           # the codes' shadows on the plane project back
    assert torch.allclose(plane.project(on_plane), coords, atol=1e-4)
    image = scatter_image(coords, splits.test.labels, plane.names)
    assert image.size == (640 + 70, 640) and len(image.getcolors(10_000)) > 10   # ten classes' colours
    flat = LatentPlane.of(codes[:, :2])
    assert torch.equal(flat.project(codes[:, :2]), codes[:, :2]) and flat.names == ["z1", "z2"]
    assert torch.allclose(flat.code(codes[:, :2]), codes[:, :2])


def test_manifold_of_a_2d_latent(tmp_path):
    config = sample_config(epochs=1, lr=1e-3)
    config.model.latent_dim = 2
    run = train(config, out=tmp_path / "run2", log=quiet).path
    model, _, _ = load_model(run, "cpu")
    assert manifold(model, n=5).shape == (25, 1, 28, 28)
    paths = vaekit("latent", run, "--n", "5", "--device", "cpu").stdout.split()
    assert [p.split("/")[-1] for p in paths] == ["latent_scatter.png", "latent_scatter_manifold.png"]
    assert Image.open(paths[1]).size == (2 * (5 * 30 + 2),) * 2


def readable(path: str) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


LABEL_ROW = 32     # px above a grid whose columns are labelled (at the CLI's scale 4)


def test_traverse_labels_each_row_and_column_beside_the_grid_itself(run, loaded, tmp_path):
    model, _, splits = loaded
    png, _ = traverse_to_png(run, dims=3, steps=5, out=tmp_path / "t.png", device="cpu")
    picture = np.asarray(Image.open(png))
    x = preprocess(splits.test.images, "static")
    dims, _ = most_active_dims(model, x, 3)
    _, images = traverse(model, x[:1], dims, torch.linspace(-3, 3, 5))
    grid = np.asarray(grid_image(images.flatten(0, 1), nrow=5))
    h, w = grid.shape
    assert np.array_equal(picture[-h:, -w:], grid) and picture.shape[0] - h == LABEL_ROW
    row_labels, col_labels = picture[-h:, :-w], picture[:-h, -w:]
    centres = [4 * (2 + 30 * i + 14) for i in range(5)]     # the middle of row/column i, in pixels
    bands = [row_labels[c - 6:c + 6] for c in centres[:3]]
    assert all((band < 128).any() for band in bands)         # dark text left of every row
    assert not np.array_equal(bands[0], bands[1])            # each its own
    assert all((col_labels[:, c - 20:c + 20] < 128).any() for c in centres)


def test_cli_commands_write_readable_pictures(run, tmp_path):
    interp = vaekit("interpolate", run, "--index", "3", "7", "--steps", "5", "--gif", "--device", "cpu").stdout.split()
    width, height = readable(interp[0]).size                # the grid, its rows and columns labelled
    assert width > 4 * (7 * 30 + 2) and height == 4 * (2 * 30 + 2) + LABEL_ROW and readable(interp[1]).n_frames == 8
    mine = run / "mine" / "t.png"      # a new file of one's own inside the run: written, and its GIF named
    trav = vaekit("traverse", run, "--dims", "3", "--steps", "5", "--out", mine, "--device", "cpu").stdout.split()
    assert trav == [str(mine), str(mine.with_suffix(".gif"))]
    width, height = readable(trav[0]).size
    assert width > 4 * (5 * 30 + 2) and height == 4 * (3 * 30 + 2) + LABEL_ROW and readable(trav[1]).n_frames == 8
    attr = vaekit("attribute", run, "--from", "3", "--to", "8", "--n", "4", "--steps", "5", "--device", "cpu")
    assert readable(attr.stdout.strip()).size == (4 * (6 * 30 + 2), 4 * (4 * 30 + 2) + LABEL_ROW)
    inp = vaekit("inpaint", run, "--mask", "left", "--n", "4", "--steps", "3", "--chains", "2", "--score-n", "20",
                 "--device", "cpu").stdout.splitlines()
    width, height = readable(inp[0]).size
    assert width > 4 * (4 * 30 + 2) and height == 4 * (3 * 30 + 2)
    assert "over 20 test images" in inp[1] and "mean-image baseline" in inp[1]
    assert readable(vaekit("latent", run, "--device", "cpu").stdout.strip()).mode == "RGB"
    mask = tmp_path / "mask.png"
    Image.new("L", (28, 28), 255).save(mask)                 # a PNG mask: every pixel missing
    custom = vaekit("inpaint", run, "--mask", mask, "--n", "2", "--steps", "2", "--chains", "1", "--score-n", "2",
                    "--out", tmp_path / "m.png", "--device", "cpu").stdout.splitlines()
    assert custom[0] == str(tmp_path / "m.png") and "784 masked pixels" in custom[1]


def assert_one_error_line(err: str, message: str) -> None:
    """The error is the last line, alone (the sample data's own warning may come before it)."""
    lines = err.splitlines()
    assert lines[-1].startswith("vaekit: error: ") and message in lines[-1], err
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["interpolate", "{run}", "--index", "0", "500"], "--index 500 is out of range: the test set has 500 images"),
    (["traverse", "{run}", "--dims", "51"], "--dims 51 is more than the model's 50 latent dimensions"),
    (["attribute", "{run}", "--to", "3", "--from", "3"], "give two different labels"),
    (["attribute", "{run}", "--to", "42"], "--to 42 is not a label of mnist"),
    (["inpaint", "{run}", "--mask", "middle"], "is neither one of top, bottom, left, right, centre"),
    (["inpaint", "{run}", "--mask", "{small}"], "is 8x8; the images are 28x28"),
    (["inpaint", "{run}", "--mask", "{black}"], "marks no pixel to fill"),
    (["inpaint", "{run}", "--method", "gibbs"], "--method must be one of pseudo-gibbs, metropolis"),
    (["latent", "{tmp}"], "not a vaekit run directory"),
    (["sample", "{run}@bogus"], "'@bogus' is not a checkpoint name of the run {run}: pass {run} (its newest weights), "
                                "{run}@best or {run}@epoch_N"),
    # a picture never takes the place of a run's own files, nor does the GIF written beside it
    (["traverse", "{run}", "--out", "{run}/training.png"], "--out {run}/training.png would write {run}/training.gif "
     "beside it, part of the run {run}, which no command writes over; choose another --out, such as "
     "{run}/samples/training.png"),
    (["interpolate", "{run}", "--gif", "--out", "{run}/training.png"], "would write {run}/training.gif beside it"),
    (["sample", "{run}", "--out", "{run}/images/image_at_epoch_0001.png"],
     "--out {run}/images/image_at_epoch_0001.png, inside {run}/images, is part of the run {run}"),
    (["latent", "{run}", "--out", "{run}/checkpoints/map.png"], ", inside {run}/checkpoints, is part of the run"),
    (["attribute", "{run}", "--to", "3", "--strength", "nan"], "--strength must be a finite number (within "),
    (["attribute", "{run}", "--to", "3", "--strength", "inf"], "--strength must be a finite number (within "),
    (["inpaint", "{run}", "--n", "600"], "--n 600 is more than the 500 test images; ask for at most 500"),
    (["attribute", "{run}", "--from", "1", "--to", "3", "--n", "300"], "--n 300 is more than the 67 test images labelled 1; ask for at most 67"),
    # each command's own advice on a grid over the limit: the seed picks the images of `sample` alone
    (["sample", "{run}", "--n", "3000"], "--n 3000 makes a grid of 3000 images, over vaekit's limit of 2500 in one "
     "picture; ask for --n 2500 or fewer (several pictures: vary --seed)"),
    (["interpolate", "{run}", "--steps", "2000"], "--steps 2000 (two paths, framed by their ends) makes a grid of "
     "4004 images, over vaekit's limit of 2500 in one picture; ask for --steps 1248 or fewer"),
    (["traverse", "{run}", "--dims", "50", "--steps", "100"], "makes a grid of 5000 images, over vaekit's limit of "
     "2500 in one picture; ask for fewer --dims or --steps"),
    (["attribute", "{run}", "--to", "3", "--n", "400"], "--n 400 x (--steps 7 + the original) makes a grid of 3200 "
     "images, over vaekit's limit of 2500 in one picture; ask for fewer --n or --steps"),
])
def test_bad_input_gets_one_line(run, tmp_path, capsys, args, message):
    small = tmp_path / "small.png"
    Image.new("L", (8, 8)).save(small)
    black = tmp_path / "black.png"
    Image.new("L", (28, 28)).save(black)
    argv = [a.format(run=run, tmp=tmp_path, small=small, black=black) for a in args]
    kept = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.relative_to(run).parts[0] != "samples"}
    assert main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert_one_error_line(err, message.format(run=run))
    assert ("--seed" in err) == ("--seed" in message)          # no advice about a flag that does not apply
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.relative_to(run).parts[0] != "samples"} \
        == kept                                                 # the run's files as they were, none added


def test_bad_input_through_the_real_entry_point(run):
    result = vaekit("traverse", run, "--index", "-1", check=False)
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "--index -1 is out of range")
