"""`vaekit plot`: learning curves of one or more runs, from their metrics.jsonl, as one PNG.

matplotlib is an optional extra (`pip install 'vaekit[plot]'`); only this module imports it.
"""
from __future__ import annotations

import importlib.util
import io
from itertools import accumulate
from pathlib import Path

from .errors import ConfigError, RunError
from .files import atomic_write_bytes
from .runs import Run, check_not_kept, parse_run_name

# (what a panel shows, its metrics.jsonl keys end with "_" + this; the prefix names the split:
# test_elbo drawn solid, any other split's, such as a validation split's, dashed)
PANELS = [("ELBO (nats/image, higher is better)", "elbo"),
          ("rate KL(q(z|x) || p(z)) (nats/image)", "rate"),
          ("distortion -log p(x|z) (nats/image)", "distortion")]


def wall_minutes(metrics: list[dict]) -> list[float]:
    """Minutes of training and test passes when each epoch's line was written (checkpoints and
    images aside), summed over epochs: a resumed run's pause does not count."""
    return [m / 60 for m in accumulate(r.get("epoch_seconds", 0) + r.get("eval_seconds", 0) for r in metrics)]


def split_keys(metrics: list[dict], quantity: str) -> list[str]:
    """The keys of `quantity` in the metrics lines, one per split, test first: ["test_elbo", "val_elbo"]."""
    keys = {key for line in metrics for key in line if key.endswith("_" + quantity) and key != "train_" + quantity}
    return sorted(keys, key=lambda k: (not k.startswith("test_"), k))


def curves_figure(runs: list[str | Path]):
    """The figure: one row per panel of PANELS, against epoch (left) and against minutes of
    training (right); each run in its colour, the test split solid and any other dashed."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("`vaekit plot` needs matplotlib: pip install 'vaekit[plot]'")
    from matplotlib import rcParams
    from matplotlib.figure import Figure      # not pyplot: no display, no global state
    from matplotlib.ticker import MaxNLocator

    curves = []
    for run in runs:
        metrics = Run.open(run).metrics()
        if not metrics:
            raise RunError(f"{run} has no metrics.jsonl lines yet: train it for an epoch first")
        curves.append((str(run), metrics))
    fig = Figure(figsize=(12, 3.2 * len(PANELS)), layout="tight")
    axes = fig.subplots(len(PANELS), 2, squeeze=False, sharex="col")
    colours = rcParams["axes.prop_cycle"].by_key()["color"]
    for (title, quantity), row in zip(PANELS, axes):
        for i, (name, metrics) in enumerate(curves):
            x_axes = ([m["epoch"] for m in metrics], wall_minutes(metrics))
            for key in split_keys(metrics, quantity):
                lines = [j for j, m in enumerate(metrics) if key in m]
                for ax, xs in zip(row, x_axes):
                    ax.plot([xs[j] for j in lines], [metrics[j][key] for j in lines],
                            "-" if key.startswith("test_") else "--", color=colours[i % len(colours)],
                            marker="." if len(lines) < 30 else None, label=f"{name} ({key.rsplit('_', 1)[0]})")
        for ax in row:
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("epoch")
    axes[-1][0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1][1].set_xlabel("minutes of training (epochs + test passes)")
    axes[0][0].legend(fontsize=8)
    return fig


def plot_runs(runs: list[str | Path], out: str | Path | None = None) -> Path:
    """Test (and validation, where the metrics have it) ELBO, rate and distortion of each run,
    against epoch and against training time, the runs overlaid. Writes `out` (default:
    RUN/curves.png for one run, ./curves.png for several); returns its path."""
    out = Path(out or (parse_run_name(runs[0]).out / "curves.png" if len(runs) == 1 else "curves.png"))
    check_not_kept(out)
    fig = curves_figure(runs)
    kind = out.suffix[1:].lower() or "png"
    if kind not in fig.canvas.get_supported_filetypes():
        raise ConfigError(f"--out {out}: matplotlib cannot write .{kind} files; end it in .png (or .svg, .pdf)")
    buffer = io.BytesIO()       # drawn in memory, then written whole or not at all
    fig.savefig(buffer, dpi=100, format=kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buffer.getvalue())
    return out
