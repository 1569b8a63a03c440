"""What every backbone's data loading shares: the cache folder, atomic writes, the hub check, split carving.

Backbones import these instead of each other's private helpers; nothing here knows a dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from dyntie_cli.errors import DyntieError


def default_cache_dir() -> Path:
    """Where tokenizers, token arrays and decoded images are cached: ``$DYNTIE_CACHE``, else ``~/.cache/dyntie``."""
    return Path(os.environ.get("DYNTIE_CACHE") or Path.home() / ".cache" / "dyntie").expanduser()


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename: a concurrent run or a killed one never
    leaves a half-written cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


#: "gpt2" or "owner/name": what the hub accepts; anything else that does not exist is a mistyped path
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub can be reached: False at once when an offline variable is set."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() not in ("", "0", "false", "no", "off"):
            return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def carve(n: int, sizes: Sequence[tuple[str, int]], *, seed: int | None = None,
          too_few: str = "") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Split ``n`` units into the roles of ``sizes`` (role, count) and the rest; returns (rest, role -> indices).

    ``seed=None``: contiguous slices, the roles one after another at the end (text: evaluation text is a
    continuous stretch); with a seed: the roles take the first slices of a seeded permutation, in order, and the
    rest what remains. The roles never overlap each other or the rest. ``too_few`` is the error raised (with
    the counts appended) when nothing would be left for the rest.
    """
    total = sum(size for _, size in sizes)
    if total >= n:
        raise DyntieError(too_few or f"Only {n} units, too few to carve {total} from.")
    if seed is None:
        order, start = np.arange(n), n - total
        rest = order[:start]
    else:
        order, start = np.random.default_rng(seed).permutation(n), 0
        rest = order[total:]
    roles = {}
    for role, size in sizes:
        roles[role] = order[start: start + size]
        start += size
    return rest, roles


# -- pretrained folders and exports (docs/export.md) ------------------------------------------------


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers draws a weight-loading bar on stderr; dyntie's own progress view owns the terminal."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def require_data_dir(path: Path, holding: str) -> None:
    """One sentence for a --data-dir that is no folder: missing, or a file."""
    if path.is_dir():
        return
    problem = "is a file, not a folder" if path.exists() else "does not exist"
    raise DyntieError(f"Data folder {path} {problem}: pass --data-dir DIR {holding}.")


def init_location(init: str, library: str) -> Path | str:
    """``--init`` as a local path (must exist), or a hub id when the hub is reachable; else one sentence."""
    path = Path(init).expanduser()
    if path.exists():
        return path
    looks_like_id = all(part and not part.startswith(".") for part in init.split("/")) and init.count("/") <= 1
    if looks_like_id and hub_reachable():
        return init
    raise DyntieError(f"--init {init} is no local file or folder (and the hub is not reachable for a {library} "
                      "id): pass a folder that exists.")


def read_json_config(folder: Path, what: str) -> dict[str, Any]:
    """A folder's ``config.json``, or one sentence saying the folder is not a saved model."""
    file = folder / "config.json"
    if not file.is_file():
        raise DyntieError(f"--init {folder} is not a saved model folder (no config.json): pass {what}.")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        raise DyntieError(f"--init {folder} has an unreadable config.json: pass {what}.") from None
    if not isinstance(config, dict):
        raise DyntieError(f"--init {folder} has a config.json that is no JSON object: pass {what}.")
    if config.get("dyntie_format") == "compact":
        raise DyntieError(f"--init {folder} is a compact export (independent blocks only): export the run with "
                          "--format full and start from that folder.")
    return config


def described_model(config: dict[str, Any]) -> str:
    """What kind of model a config.json describes, for an error that names it."""
    if "model_type" in config:
        return f"a transformers {config['model_type']} model"
    if "architecture" in config:
        return f"a timm {config['architecture']} model"
    return "no model dyntie knows"


def save_hf_tokenizer(tokenizer: Any, folder: Path, **special_tokens: str) -> None:
    """Save a ``tokenizers.Tokenizer`` as a transformers tokenizer folder (``AutoTokenizer.from_pretrained``
    loads it offline). The tokenizer.json is the run's own, byte for byte, so a run started from the folder
    finds the token cache of the run that wrote it."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens).save_pretrained(str(folder))
    (folder / "tokenizer.json").write_text(tokenizer.to_str())
