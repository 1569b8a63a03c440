"""What a checkpoint folder says of its run, read without torch (reports read it): ``run.json``, the checkpoint's
step and what a variant took from its source run. ``core/checkpoint.py`` writes it with the rest of the folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"


def load_run_file(path: Path) -> dict[str, Any] | None:
    """``run.json`` of checkpoint folder ``path`` (its ``step`` and ``source``), or None where the folder has none
    (a checkpoint written before the file existed) or it cannot be read."""
    try:
        return json.loads((Path(path) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
