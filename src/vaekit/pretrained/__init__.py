"""Models trained by vaekit's own recipes, shipped inside the package (docs/pretrained.md).

Each is a folder NAME/ holding config.json, metrics.jsonl and model.safetensors: a run directory
reduced to what inference needs. `pretrained:NAME` names it wherever a command takes a RUN
(runs.resolve); it is read-only, so commands write what they make of it under ./pretrained-NAME/.
"""
from __future__ import annotations

from pathlib import Path

PREFIX = "pretrained:"
FOLDER = Path(__file__).parent


def names() -> list[str]:
    """The shipped models' names, e.g. ["mnist"]."""
    return sorted(p.name for p in FOLDER.iterdir() if (p / "config.json").is_file())


def is_pretrained(run) -> bool:
    """Whether `run` (a path or a string) names a shipped model, `pretrained:NAME`."""
    return str(run).startswith(PREFIX)

