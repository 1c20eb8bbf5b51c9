"""The command line: parses, then calls the Python API. Nothing here that `import vaekit` lacks."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing
from pathlib import Path

from . import api
from .config import Config, ConfigError
from .data import DataError
from .runs import RunError

USER_ERRORS = (ConfigError, DataError, RunError)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field (e.g. --latent-dim, --batch-size), default None = "not given"."""
    for part in dataclasses.fields(Config):
        group = parser.add_argument_group(f"{part.name} settings")
        part_cls = typing.get_type_hints(Config)[part.name]
        hints = typing.get_type_hints(part_cls)
        for f in dataclasses.fields(part_cls):
            kind = hints[f.name]
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else None
            if kind is bool:
                group.add_argument(flag, dest=f"{part.name}.{f.name}", action=argparse.BooleanOptionalAction,
                                   default=None, help=f"(default: {default})")
            else:
                base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
                group.add_argument(flag, dest=f"{part.name}.{f.name}", type=base, default=None,
                                   metavar=base.__name__.upper(), help=f"(default: {default})")


def _config_overrides(args: argparse.Namespace) -> dict:
    overrides: dict[str, dict] = {}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            part, name = key.split(".", 1)
            overrides.setdefault(part, {})[name] = value
    return overrides


def _cmd_train(args) -> None:
    overrides = _config_overrides(args)
    if args.resume:
        extra = {k for part in overrides.values() for k in part} - {"epochs"}
        if extra:
            raise ConfigError(f"--resume continues a run with its own config.json; only --epochs may change "
                              f"(got {', '.join(sorted(extra))})")
        api.train(resume=args.resume, epochs=overrides.get("train", {}).get("epochs"))
        return
    config = Config.from_dict(overrides, source="command line")
    out = args.out or Path("runs") / f"cvae-{config.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    api.train(config, out=out)


def _cmd_data(args) -> None:
    if args.action == "fetch":
        path = api.fetch(args.name, args.data_dir)
        print(f"{args.name}: ready in {path}")
    else:
        for key, value in api.dataset_info(args.name, args.data_dir).items():
            print(f"{key:>14}: {value}")


def _cmd_sample(args) -> None:
    print(api.sample_to_png(args.run, n=args.n, seed=args.seed, out=args.out, device=args.device))


def _cmd_reconstruct(args) -> None:
    print(api.reconstruct_to_png(args.run, n=args.n, seed=args.seed, out=args.out,
                                 data_dir=args.data_dir, device=args.device))


def _cmd_gif(args) -> None:
    print(api.make_gif(args.run))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaekit", description="Train variational autoencoders on images "
                                     "and generate new ones.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model into a run directory (or resume one)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="the new run directory (default: runs/cvae-DATASET-TIME)")
    where.add_argument("--resume", type=Path, metavar="RUN", help="go on with this run from its last checkpoint")
    _add_config_flags(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("data", help="fetch a dataset or show where it is")
    p.add_argument("action", choices=["fetch", "info"])
    p.add_argument("name", help="mnist, fashion-mnist or kmnist")
    p.add_argument("--data-dir", type=Path, help="a folder holding the IDX files, to use instead of fetching")
    p.set_defaults(func=_cmd_data)

    def run_command(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("run", type=Path, metavar="RUN", help="a run directory made by `vaekit train`")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", type=Path, help="the PNG to write (default: inside RUN/samples/)")
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        p.set_defaults(func=func)
        return p

    run_command("sample", "decode new codes drawn from the prior into a grid",
                _cmd_sample).add_argument("--n", type=int, default=100, help="how many images (default 100)")
    p = run_command("reconstruct", "test images beside their decodes (codes drawn from q(z|x))", _cmd_reconstruct)
    p.add_argument("--n", type=int, default=16, help="how many test images (default 16)")
    p.add_argument("--data-dir", type=Path, help="a folder holding the IDX files, to use instead of fetching")

    p = sub.add_parser("gif", help="make RUN/training.gif again from RUN/images")
    p.add_argument("run", type=Path, metavar="RUN")
    p.set_defaults(func=_cmd_gif)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"vaekit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vaekit: interrupted", file=sys.stderr)
        return 130
    return 0
