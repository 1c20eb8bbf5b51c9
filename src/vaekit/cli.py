"""The command line: parses, then calls the Python API. Nothing here that `import vaekit` lacks.

Each command is two functions side by side, `_NAME_flags(parser)` declaring its flags and
`_NAME(args)` calling the API with them, and one row of COMMANDS; a new command is a new pair and
a new row. The flags several commands take (RUN, --seed, --device, --precision, --data-dir, a
picture's --out) are declared once each, at the top, and each command names the ones it takes.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path

from . import api, pretrained
from .config import COMPILE_MODES, DEVICES, FOLDER, FOLDER_SETTINGS, IDX_DATASETS, PRECISIONS, Config, DataConfig, check_seed
from .errors import ConfigError, Interrupted, VaekitError
from .evaluate import eval_table
from .launch import check_nproc, launch, launched_by_torchrun
from .runs import Run, parse_run_name


# -- the flags several commands take, each declared once ------------------------------------------
RUN_HELP = ("a run directory made by `vaekit train` (RUN@best: its best validation epoch), or pretrained:NAME, "
            f"a model shipped with vaekit ({', '.join('pretrained:' + n for n in pretrained.names())})")


def _add_run(p: argparse.ArgumentParser, **kwargs) -> None:
    p.add_argument("run", type=Path, metavar="RUN", **{"help": RUN_HELP, **kwargs})


def _seed(text: str) -> int:
    """--seed: a whole number in the range config.check_seed allows."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    try:
        check_seed(seed, flag="the seed")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return seed


def _add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=_seed, default=0, help="seeds every draw of the command (default 0)")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto (default): cuda if torch sees a GPU, else cpu")


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="the arithmetic of the decodes: auto (default) picks bf16 where the hardware runs it "
                        "natively (AVX512-BF16 or AMX CPUs, Ampere and newer GPUs), as training does")


def _add_data_dir(p: argparse.ArgumentParser, help: str = "a folder holding the IDX files, to use instead of "
                  "fetching") -> None:
    p.add_argument("--data-dir", type=Path, help=help)


def _image_path(text: str) -> Path:
    """--out of the commands that write pictures: a name Pillow can write an image to."""
    from PIL import Image

    path = Path(text)
    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        raise argparse.ArgumentTypeError(f"{text} does not end in an image file extension; end it in .png")
    return path


def _add_picture_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=_image_path, help="the PNG to write (default: inside RUN/samples/)")


def _count_or_all(text: str) -> int | None:
    """--score-n's value: a number, or `all` (None)."""
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor `all`") from None


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the problem and where the fix is
    (subcommand parsers inherit this class)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}   # the top parser's: each command's, by name

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")

    def parse_args(self, args=None, namespace=None):
        """argparse's, but a flag no parser knows is refused by its command's parser, which points at
        that command's help (`vaekit sample --help`) rather than at the list of commands."""
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            handler = getattr(parsed, "handler", None)
            parser = self.commands.get(handler.name, self) if handler else self
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed


# -- the config's fields as flags (train, data) ------------------------------------------------------
def _add_config_flags(parser: argparse.ArgumentParser, only: set[str] | None = None) -> None:
    """One flag per Config field (e.g. --latent-dim, --batch-size), default None = "not given";
    `only`: just the fields named "part.field"."""
    for part in dataclasses.fields(Config):
        group = parser.add_argument_group(f"{part.name} settings")
        part_cls = typing.get_type_hints(Config)[part.name]
        hints = typing.get_type_hints(part_cls)
        for f in dataclasses.fields(part_cls):
            if only is not None and f"{part.name}.{f.name}" not in only:
                continue
            kind = hints[f.name]
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else None
            text = f"{f.metadata['help']} (default: {default})" if "help" in f.metadata else f"(default: {default})"
            if kind is bool:
                group.add_argument(flag, dest=f"{part.name}.{f.name}", action=argparse.BooleanOptionalAction,
                                   default=None, help=text)
            else:
                base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
                group.add_argument(flag, dest=f"{part.name}.{f.name}", type=base, default=None,
                                   metavar=base.__name__.upper(), help=text)


def _config_overrides(args: argparse.Namespace) -> dict:
    overrides: dict[str, dict] = {}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            part, name = key.split(".", 1)
            overrides.setdefault(part, {})[name] = value
    return overrides


def _config_flags(overrides: dict) -> list[str]:
    """The flags that give `overrides` (the inverse of _config_overrides), for the ranks --nproc starts."""
    flags = []
    for part in overrides.values():
        for name, value in part.items():
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                flags.append(flag if value else "--no-" + flag[2:])
            else:
                flags += [flag, str(value)]
    return flags


def _with_config_file(path: Path | None, overrides: dict) -> dict:
    """The settings of a --config FILE (a JSON object of config.json's shape, any part of it), with
    the command line's flags over them."""
    if path is None:
        return overrides
    try:
        settings = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read --config {path}: {e}; pass a JSON file shaped like a run's config.json") from None
    if not isinstance(settings, dict) or not all(isinstance(v, dict) for v in settings.values()):
        raise ConfigError(f"--config {path} must hold a JSON object of parts (data, model, train), each an object")
    return {part: {**settings.get(part, {}), **overrides.get(part, {})} for part in {*settings, *overrides}}




# -- the commands: each one's flags, then what it does with them ------------------------------------
RESUME_SETTINGS = {"epochs", "data_dir"}   # what a resume may set: its length, where its data is now


def _train_flags(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="the new run directory (default: runs/cvae-DATASET-TIME)")
    where.add_argument("--resume", type=Path, metavar="RUN", help="go on with this run from its newest checkpoint "
                       "(--epochs may extend it; --data-dir says where its data is now)")
    p.add_argument("--config", type=Path, metavar="FILE", help="start from the settings in FILE (JSON shaped like a "
                   "run's config.json, any part of it; the recipes in configs/), flags overriding them")
    p.add_argument("--fall-back", action="store_true", help="with --resume: when the newest checkpoint is damaged, "
                   "go on from the newest intact one (the damaged ones are moved to RUN/checkpoints/set-aside/)")
    launcher = p.add_argument_group("processes (see README: several GPUs and machines)")
    launcher.add_argument("--nproc", type=int, default=1, metavar="N",
                          help="train on N processes of this machine (one per GPU, or CPU processes) through "
                               "torchrun; the batch size stays the global batch (default 1)")
    launcher.add_argument("--max-restarts", type=int, default=0, metavar="N",
                          help="with --nproc: restart all processes up to N times after a failure, going on "
                               "from the last checkpoint (default 0)")
    _add_config_flags(p)


def _train(args) -> int | None:
    overrides = _config_overrides(args)
    if args.fall_back and not args.resume:
        raise ConfigError("--fall-back applies to --resume RUN only; leave it out")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts must be at least 0, got {args.max_restarts}")
    if args.max_restarts and args.nproc == 1:
        raise ConfigError("--max-restarts applies to --nproc N only (it restarts the processes --nproc starts); "
                          "leave it out")
    if args.config and args.resume:
        raise ConfigError("--resume continues a run with its own config.json; leave --config out")
    if args.resume:
        extra = {k for part in overrides.values() for k in part} - RESUME_SETTINGS
        if extra:
            raise ConfigError(f"--resume continues a run with its own config.json; only --epochs and --data-dir "
                              f"may change (got {', '.join(sorted(extra))})")
    else:
        config = Config.from_dict(_with_config_file(args.config, overrides),
                                  source=f"{args.config} and the command line" if args.config else "command line")
        out = args.out or Path("runs") / f"cvae-{config.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1:
        if launched_by_torchrun():
            raise ConfigError("--nproc starts torchrun itself; under torchrun, leave it out")
        # said here, once, rather than by every rank torchrun would start
        run_config = Run.open(args.resume).config() if args.resume else config
        check_nproc(args.nproc, run_config.train.device)
        run_config.check_processes(args.nproc)
        where = ["--resume", str(args.resume)] if args.resume else ["--out", str(out)]
        where += ["--fall-back"] if args.fall_back else []
        where += ["--config", str(args.config)] if args.config else []
        return launch(args.nproc, ["train", *where, *_config_flags(overrides)], args.max_restarts)
    if args.resume:
        api.train(resume=args.resume, epochs=overrides.get("train", {}).get("epochs"),
                  data_dir=overrides.get("data", {}).get("data_dir"), fall_back=args.fall_back)
    else:
        api.train(config, out=out)
    return None


def _train_prior_flags(p: argparse.ArgumentParser) -> None:
    _add_run(p, help="a run directory made by `vaekit train --family vq`")
    p.add_argument("--epochs", type=int, help="train the prior up to this many epochs (default: as it was started, "
                   "else the run's --epochs); run again to go on from its newest checkpoint")


def _train_prior(args) -> None:
    api.train_prior(args.run, epochs=args.epochs)


def _data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["fetch", "info"])
    p.add_argument("name", help=f"{', '.join(IDX_DATASETS)}, or {FOLDER} (the images under --data-dir)")
    _add_data_dir(p, help=f"a folder holding the IDX files, to use instead of fetching; for {FOLDER}, the images")
    _add_config_flags(p, {f"data.{name}" for name in FOLDER_SETTINGS})


def _data(args) -> None:
    data = DataConfig(dataset=args.name, data_dir=args.data_dir and str(args.data_dir),
                      **_config_overrides(args).get("data", {}))
    if args.action == "fetch":
        path = api.fetch(data)
        print(f"{args.name}: ready in {path}")
    else:
        for key, value in api.dataset_info(data).items():
            print(f"{key:>14}: {value}")


def _sample_flags(p: argparse.ArgumentParser) -> None:
    _add_run(p)
    _add_seed(p)
    _add_picture_out(p)
    _add_device(p)
    _add_precision(p)
    p.add_argument("--n", type=int, default=100, help="how many images (default 100)")
    p.add_argument("--label", type=int, help="the class to draw, for a class-conditional model (--conditional)")


def _sample(args) -> None:
    print(api.sample_to_png(args.run, n=args.n, seed=args.seed, out=args.out, device=args.device, label=args.label,
                            precision=args.precision))


def _eval_flags(p: argparse.ArgumentParser) -> None:
    _add_run(p)
    _add_seed(p)
    _add_device(p)
    _add_data_dir(p)
    p.add_argument("--k", type=int, default=5000, help="importance samples per test image (default 5000, as Burda "
                   "et al.); N*K decodes: minutes on a GPU, hours on a CPU (--k 100 for a quick look)")
    p.add_argument("--binarization", help="static, dynamic or none (default: as the run was trained); dynamic "
                   "draws the test set once from --seed; none keeps grey levels (8-bit likelihoods)")
    p.add_argument("--n", type=int, metavar="N", help="score the first N test images only, for a quick estimate "
                   "(default: all); every mean comes with its standard error over the images scored")
    _add_precision(p)
    p.add_argument("--decode-batch", type=int, metavar="N", help="decodes at once (default: the fastest, measured "
                   "on this device in a few seconds for long evaluations, within --max-memory)")
    p.add_argument("--max-memory", type=float, metavar="MB", help="memory the decodes may use (default 1024 MB on "
                   "CPU, half the free memory of a GPU); the seed's model needs about 0.34 MB per decode")
    p.add_argument("--compile", choices=COMPILE_MODES, help="torch.compile the importance-sampling pass: auto "
                   "(where it measured faster: on a GPU, and for the spatial family on a CPU when 10^6 decodes or "
                   "more), on or off (default: the run's --compile)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="processes that share the importance-"
                   "sampling pass on a CPU, each with its share of the threads (default 1; on a 2-core EPYC, 2 "
                   "measured 0.97-1.12x of 1); --max-memory is each one's")


def _eval(args) -> None:
    api.eval_to_json(args.run, k=args.k, binarization=args.binarization, seed=args.seed, n=args.n,
                     decode_batch=args.decode_batch, max_memory_mb=args.max_memory, data_dir=args.data_dir,
                     device=args.device, precision=args.precision, compile=args.compile, workers=args.workers,
                     report=lambda result: print(eval_table(result), flush=True),   # shown before it is saved
                     log=lambda line: print(line, flush=True))
    print(f"saved in {Run.open(args.run).eval_path}")


def _test_image_flags(p: argparse.ArgumentParser) -> None:
    """The flags of the commands that decode the run's test images: RUN, --seed, --out, --device,
    --precision, --data-dir (each command adds its own after them)."""
    _add_run(p)
    _add_seed(p)
    _add_picture_out(p)
    _add_device(p)
    _add_precision(p)
    _add_data_dir(p)


def _reconstruct_flags(p: argparse.ArgumentParser) -> None:
    _test_image_flags(p)
    p.add_argument("--n", type=int, default=16, help="how many test images (default 16)")


def _reconstruct(args) -> None:
    print(api.reconstruct_to_png(args.run, n=args.n, seed=args.seed, out=args.out, data_dir=args.data_dir,
                                 device=args.device, precision=args.precision))


def _interpolate_flags(p: argparse.ArgumentParser) -> None:
    _test_image_flags(p)
    p.add_argument("--index", type=int, nargs=2, default=[0, 1], metavar=("A", "B"),
                   help="the two test images (default 0 1)")
    p.add_argument("--steps", type=int, default=10, help="images on each path (default 10)")
    p.add_argument("--gif", action="store_true", help="also write an animation beside the PNG")


def _interpolate(args) -> None:
    print(*api.interpolate_to_png(args.run, index=tuple(args.index), steps=args.steps, gif=args.gif, seed=args.seed,
                                  out=args.out, data_dir=args.data_dir, device=args.device,
                                  precision=args.precision), sep="\n")


def _traverse_flags(p: argparse.ArgumentParser) -> None:
    _test_image_flags(p)
    p.add_argument("--index", type=int, default=0, help="the test image whose code is varied (default 0)")
    p.add_argument("--dims", type=int, default=8, help="how many dimensions, most KL first (default 8)")
    p.add_argument("--steps", type=int, default=9, help="values from -3 to 3 (default 9)")


def _traverse(args) -> None:
    print(*api.traverse_to_png(args.run, index=args.index, dims=args.dims, steps=args.steps, seed=args.seed,
                               out=args.out, data_dir=args.data_dir, device=args.device,
                               precision=args.precision), sep="\n")


def _attribute_flags(p: argparse.ArgumentParser) -> None:
    _test_image_flags(p)
    p.add_argument("--to", type=int, required=True, help="the label to morph toward")
    p.add_argument("--from", dest="from_", type=int, help="the label to morph from (default: every other label)")
    p.add_argument("--n", type=int, default=8, help="how many test images (default 8)")
    p.add_argument("--strength", type=float, default=2.0, help="the largest multiple of the vector (default 2)")
    p.add_argument("--steps", type=int, default=7, help="strengths from 0 to --strength (default 7)")


def _attribute(args) -> None:
    print(api.attribute_to_png(args.run, to=args.to, from_=args.from_, n=args.n, strength=args.strength,
                               steps=args.steps, seed=args.seed, out=args.out, data_dir=args.data_dir,
                               device=args.device, precision=args.precision))


def _inpaint_flags(p: argparse.ArgumentParser) -> None:
    _test_image_flags(p)
    p.add_argument("--mask", default="centre", help="top, bottom, left, right, centre (default) or a PNG of the "
                   "image's size, white = missing")
    p.add_argument("--n", type=int, default=8, help="test images in the picture (default 8)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    p.add_argument("--chains", type=int, default=4, help="independent chains per image (default 4)")
    p.add_argument("--method", default="pseudo-gibbs", help="pseudo-gibbs (default) or metropolis "
                   "(Metropolis-within-Gibbs, Mattei & Frellsen 2018)")
    p.add_argument("--score-n", type=_count_or_all, default=1000, metavar="N",
                   help="score the first N test images, or all of them with `all` (default 1000)")


def _stderr(value: float | None) -> str:
    """A standard error as printed: n/a where there is none (one image)."""
    return "n/a" if value is None else f"{value:.2f}"


def _inpaint(args) -> None:
    png, s = api.inpaint_to_png(args.run, mask=args.mask, n=args.n, steps=args.steps, chains=args.chains,
                                method=args.method, score_n=args.score_n, seed=args.seed, out=args.out,
                                data_dir=args.data_dir, device=args.device, precision=args.precision)
    print(png)
    chains = f", {s['chains']} chains x {s['steps']} steps" if "chains" in s else ""
    print(f"log p(true masked pixels), nats/image over {s['n']} test images, {s['masked_pixels']} masked pixels "
          f"each ({s['protocol']}; {s['method']}{chains}; +- one standard error): "
          + ", ".join(f"{label} {s[key]:.2f} +- {_stderr(s[key + '_stderr'])}" for label, key in
                      (("inpainting", "inpainting"), ("mean-image baseline", "mean_image_baseline"), ("gain", "gain"))))


def _latent_flags(p: argparse.ArgumentParser) -> None:
    _test_image_flags(p)
    p.add_argument("--n", type=int, default=20, help="manifold side, for a 2-D latent (default 20)")


def _latent(args) -> None:
    print(*api.latent_map_to_png(args.run, n=args.n, seed=args.seed, out=args.out, data_dir=args.data_dir,
                                 device=args.device, precision=args.precision), sep="\n")


def _serve_flags(p: argparse.ArgumentParser) -> None:
    _add_run(p, nargs="?", default="pretrained:mnist", help=RUN_HELP + " (default: pretrained:mnist)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this "
                   "machine only)")
    p.add_argument("--port", type=int, default=8000, help="the TCP port (default 8000)")
    _add_device(p)
    _add_data_dir(p)
    _add_precision(p)


def _serve(args) -> None:
    """The web demo lives in an extra; without it, say how to get it instead of a traceback."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"the web demo needs {' and '.join(missing)}: pip install 'vaekit[demo]'")
    from .serve import serve

    serve(args.run, host=args.host, port=args.port, device=args.device, data_dir=args.data_dir,
          precision=args.precision)


def _plot_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN", help=RUN_HELP)
    p.add_argument("--out", type=Path, help="the PNG to write (default: RUN/curves.png for one run, "
                   "./curves.png for several)")


def _plot(args) -> None:
    print(api.plot_runs(args.runs, args.out))


def _export_flags(p: argparse.ArgumentParser) -> None:
    _add_run(p)
    p.add_argument("--format", default="onnx", help="onnx (the only one so far)")
    p.add_argument("--out", type=Path, help="the folder to write (default: RUN/onnx/)")


def _export(args) -> None:
    result = api.export_run(args.run, args.format, args.out)
    print(*result["files"], sep="\n")
    codes = "" if "codes_differing" not in result else f"; codes differing: {result['codes_differing']}" + (
        " (near ties: distances rounded in another order)" if result["codes_differing"] else "")
    print(f"checked with onnxruntime against torch: largest difference {result['max_abs_diff']:.1e}{codes}")


def _gif_flags(p: argparse.ArgumentParser) -> None:
    _add_run(p, help="a run directory made by `vaekit train`")


def _gif(args) -> None:
    print(api.make_gif(args.run))


@dataclasses.dataclass(frozen=True)
class Command:
    """A row of COMMANDS. `writes_beside_run`: what it makes of RUN goes under RUN unless --out says
    otherwise (for a shipped model, read-only, under ./pretrained-NAME: main says so)."""
    name: str
    help: str
    flags: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    writes_beside_run: bool = False


COMMANDS = (
    Command("train", "train a model into a run directory (or resume one)", _train_flags, _train),
    Command("train-prior", "vq runs: fit the code prior to the frozen first stage's codes, in RUN/prior (resumable)",
            _train_prior_flags, _train_prior),
    Command("data", "fetch a dataset or show where it is", _data_flags, _data),
    Command("sample", "decode new codes drawn from the prior into a grid", _sample_flags, _sample, True),
    Command("reconstruct", "test images beside their decodes (codes drawn from q(z|x))", _reconstruct_flags,
            _reconstruct, True),
    Command("eval", "test ELBO (rate, distortion), importance-sampled NLL, active units -> RUN/eval.json",
            _eval_flags, _eval, True),
    Command("interpolate", "linear and spherical paths between two test images' codes", _interpolate_flags,
            _interpolate, True),
    Command("traverse", "vary the most used latent dimensions one at a time over -3..3", _traverse_flags, _traverse,
            True),
    Command("attribute", "morph test images of one label toward another by the class-mean code difference",
            _attribute_flags, _attribute, True),
    Command("inpaint", "fill a masked region of test images; score it against the mean image", _inpaint_flags,
            _inpaint, True),
    Command("latent", "scatter of the test set's codes by label (PCA beyond 2-D); 2-D: the manifold too",
            _latent_flags, _latent, True),
    Command("serve", "a web page to play with a run: samples, sliders, drawing, inpainting (needs pip install "
            "'vaekit[demo]')", _serve_flags, _serve),
    Command("plot", "learning curves (test ELBO, rate, distortion) of runs against epoch and time, overlaid, as a "
            "PNG (needs pip install 'vaekit[plot]')", _plot_flags, _plot),
    Command("export", "the encoder and decoder as encoder.onnx and decoder.onnx, any batch size (needs pip install "
            "'vaekit[export]')", _export_flags, _export, True),
    Command("gif", "make RUN/training.gif again from RUN/images", _gif_flags, _gif),
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="vaekit", description="Train variational autoencoders on images "
                                     "and generate new ones.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help)
        command.flags(p)
        p.set_defaults(handler=command)
        parser.commands[command.name] = p
    return parser


def _say_where_a_shipped_model_went(args) -> None:
    """A shipped model is read-only: when --out did not say, name the folder its results went to."""
    if not args.handler.writes_beside_run or getattr(args, "out", None) is not None:
        return
    name = parse_run_name(args.run)
    if name.shipped:
        print(f"vaekit: {args.run} is read-only (shipped inside vaekit), so this was written under "
              f"./{name.out}/", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.handler.run(args)
        _say_where_a_shipped_model_went(args)
    except VaekitError as e:
        print(f"vaekit: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:   # training saved a checkpoint, an evaluation its bounds, and said how to go on
        return 128 + e.signum
    except OSError as e:      # a read-only or full disk under a picture or a result: one line, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"vaekit: error: {where}{e.strerror or e}; choose another --out, free disk space or fix the "
              "permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vaekit: interrupted", file=sys.stderr)
        return 130
    return code or 0
