"""Models trained by vaekit's own recipes, shipped inside the package (docs/pretrained.md).

Each is a folder NAME/ holding config.json, metrics.jsonl and model.safetensors: a run directory
reduced to what inference needs. `pretrained:NAME` names it wherever a command takes a RUN (the
syntax is runs.py's: runs.parse_run_name); it is read-only, so commands write what they make of it
under ./pretrained-NAME/.
"""
from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).parent


def names() -> list[str]:
    """The shipped models' names, e.g. ["mnist"]."""
    return sorted(p.name for p in FOLDER.iterdir() if (p / "config.json").is_file())
