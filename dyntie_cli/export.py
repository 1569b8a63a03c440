"""Models out of dyntie: a run's model from its last checkpoint, ``dyntie export``, and ``load_tied``.

A checkpoint (core/checkpoint.py) holds the independent blocks only, plus the tie map. An export is a folder
of the backbone's own library (transformers, timm), written by the backbone's ``export_model`` hook:

* ``full`` -- every tied block written as a copy of its root: a plain library folder that loads with
  ``from_pretrained`` / ``timm.create_model`` and no dyntie installed;
* ``compact`` -- the same folder with each independent block stored once (``compact.safetensors``) and the tie
  map in ``config.json`` (``dyntie_tie_map``); :func:`load_tied` rebuilds it with real sharing. It has no
  ``model.safetensors``, so a plain ``from_pretrained`` fails loudly instead of filling the tied blocks with
  random weights.

Every export checks its own round trip before it is moved into place: the folder, loaded back by the library
(full) or by ``load_tied`` (compact), must give the run's model's outputs on a fixed batch to 1e-5 (fp32).
docs/export.md is the user's page.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .backbone import Backbone, Batch, TaskData
from .core import checkpoint as ckpt
from .core.ties import TieManager, all_independent, independent_count
from .errors import DyntieError, UsageError
from .results.lineage import RecordedRun, load_run
from .settings import RunSettings

FORMATS = ("full", "compact")
#: the largest difference between the run's outputs and the export's that the round trip accepts (fp32)
TOLERANCE = 1e-5
#: the weights file of a compact export (not model.safetensors: a plain loader must not half-load it)
COMPACT_WEIGHTS = "compact.safetensors"
#: rows of the first validation batch that the round trip compares
CHECK_ROWS = 4


@dataclass
class RunModel:
    """A recorded run's model as its last checkpoint left it, tied as it was."""

    run: RecordedRun
    backbone: Backbone
    settings: RunSettings
    data: TaskData
    model: nn.Module
    ties: TieManager


def checkpoint_dir(run: RecordedRun, *, best: bool = False) -> Path:
    """Where a run keeps its last checkpoint (``best``: the model of its best validation figure), or one sentence
    saying it has none."""
    if best:
        return best_dir(run)
    folder = Path(run.out_dir) / "checkpoint" if run.out_dir else None
    # a run killed in the middle of a checkpoint swap left its last checkpoint under the old name
    found = folder if folder is None or folder.exists() else folder.with_name(folder.name + ".old")
    if found is None or not (found / "ties.json").is_file() or not (found / "model.safetensors").is_file():
        where = f" (looked in {folder})" if folder else ""
        raise DyntieError(f"Run {run.run_id} ({run.status}) has no checkpoint yet{where}: a run saves one at each "
                          "validation and at its end, so wait for its first validation (or train with --set "
                          "train.checkpoint_every=N).")
    return folder


def best_dir(run: RecordedRun) -> Path:
    """Where a run keeps the model of its best validation figure, or one sentence saying it has none."""
    folder = Path(run.out_dir) / "best" if run.out_dir else None
    if folder is None or ckpt.load_model_info(folder) is None:
        raise DyntieError(f"Run {run.run_id} ({run.status}) has no best model yet: a run keeps one from its first "
                          "validation when it selects its best (train.select_best, the default since runs record "
                          "best_step); export its last model without --best.")
    return folder


def load_run_model(db: Path, run_id: str, *, best: bool = False) -> RunModel:
    """The model of run ``run_id`` (a finished, killed or running one) from its last checkpoint (``best``: the
    model of its best validation figure), on the CPU, in eval mode. A running run may replace the folder while
    it is read: the tie map and the weights are read from one checkpoint (``checkpoint.snapshot``), the one in
    place when the read began."""
    from .runner.settings_source import recorded_settings

    run = load_run(db, run_id)
    if run.status == "diverged":
        raise DyntieError(f"Run {run.run_id} diverged (`dyntie report --table runs --run {run.run_id}` says where), so "
                          "it has no trained model: train it again with a lower train.lr.")
    folder = checkpoint_dir(run, best=best)
    backbone, settings = recorded_settings(run.config, [])
    data = backbone.load_data(settings)
    with ckpt.snapshot(folder) as files:
        state = ckpt.load_tie_map(files)
        model = backbone.build_model(settings, data)
        ties = TieManager(backbone.blocks(model), state["state"], tied_grad=state.get("tied_grad", "follow"))
        ckpt.load_model_weights(files, model)
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):  # a run that diverged unnoticed
        raise DyntieError(f"Run {run.run_id}'s checkpoint holds weights that are not finite numbers: the run "
                          "diverged, so there is no trained model; train it again with a lower train.lr.")
    return RunModel(run, backbone, settings, data, model.eval(), ties)


def fixed_batch(data: TaskData) -> Batch:
    """The first rows of the first validation batch: deterministic, never the test split."""
    batch = next(iter(data.eval_batches("validation", None)))
    return {k: v[:CHECK_ROWS] for k, v in batch.items()}


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return float((a.float() - b.float()).abs().max())


# --------------------------------------------------------------------------------------------------
# dyntie export
# --------------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    folder: Path
    format: str
    run_id: str
    difference: float
    weights_bytes: int
    full_bytes: int
    step: int | None  # the training step of the exported model (None: a checkpoint from before steps were kept)
    independent: int
    blocks: int
    trainable_fraction: float  # trainable parameters / the same model's parameters with every block its own


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, a destination that would lose something."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} is not empty; pass --overwrite to replace it, or choose another folder.")
    from .runner.jobs import check_writable_folder

    # the export is staged beside --out and renamed into place: that folder must take new files
    check_writable_folder(out.parent, "--out", shown=out)


def export_run(db: Path, run_id: str, out: Path, *, fmt: str = "full", overwrite: bool = False,
               best: bool = False) -> ExportResult:
    """Export run ``run_id``'s last checkpoint (``best``: the model of its best validation figure) to ``out`` and
    check the round trip; ``out`` is only replaced once the new folder passed."""
    if fmt not in FORMATS:
        raise UsageError(f"Unknown export format {fmt!r}; use {' or '.join(FORMATS)}.")
    out = Path(out).expanduser()
    check_destination(out, overwrite)
    check_exportable(load_run(db, run_id).backbone)
    rm = load_run_model(db, run_id, best=best)
    backbone, ties = rm.backbone, rm.ties
    step = _model_step(checkpoint_dir(rm.run, best=best))
    batch = fixed_batch(rm.data)
    with torch.no_grad():
        reference = backbone.outputs(rm.model, batch)
    state, names = list(ties.state), block_names(rm.model, ties.blocks)
    always = sum(p.numel() for p in rm.model.parameters()) - ties.block_numel() * ties.independent_layers
    conventional = always + ties.block_numel() * ties.num_blocks
    fraction = (always + ties.block_numel() * ties.independent_layers) / conventional
    # a plain model: every tied block gets its own copy of its root's weights, and the tie hooks go
    ties.apply(all_independent(ties.num_blocks))
    ties.remove_hooks()
    keys = {"dyntie_backbone": backbone.name, "dyntie_run_id": rm.run.run_id, "dyntie_format": fmt,
            "dyntie_tie_map": state, "dyntie_tied_grad": ties.tied_grad, "dyntie_blocks": names,
            "dyntie_model": "best" if best else "last", "dyntie_step": step}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    full = staging / "full"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        full.mkdir(parents=True)
        backbone.export_model(rm.model, rm.data, rm.settings, full)
        full_bytes = weights_bytes(full)
        if fmt == "full":
            _add_config_keys(full, keys)
            final = full
            with torch.no_grad():
                got = backbone.outputs(backbone.load_exported(final), batch)
        else:
            final = staging / "compact"
            _compact(full, final, names, state, keys)
            shutil.rmtree(full)
            loaded = load_tied(final)
            with torch.no_grad():
                got = backbone.outputs(loaded, batch)
            distinct = loaded.dyntie_ties.distinct_block_weights()
            if distinct != independent_count(state):
                raise DyntieError(f"The compact export of {rm.run.run_id} reloads with {distinct} distinct block "
                                  f"weights for {independent_count(state)} independent blocks; nothing was written "
                                  "(a bug: please report it).")
        difference = max_difference(reference, got)
        if not difference <= TOLERANCE:
            raise DyntieError(f"The {fmt} export of {rm.run.run_id} gives outputs {difference:.3g} away from the "
                              f"run's model (limit {TOLERANCE:g}); nothing was written (a bug: please report it).")
        size = weights_bytes(final)
        _move_into_place(final, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(out, fmt, rm.run.run_id, difference, size, full_bytes, step, independent_count(state),
                        len(state), fraction)


def _model_step(folder: Path) -> int | None:
    """The training step of the model in a checkpoint or best-model folder."""
    info = ckpt.load_model_info(folder)
    if info is not None:
        return int(info["step"])
    trainer = folder / "trainer.pt"
    return int(ckpt.load_trainer_state(folder)["step"]) if trainer.is_file() else None


#: the contract's hooks an export needs (docs/plugins.md)
EXPORT_HOOKS = ("outputs", "export_model", "load_exported")


def check_exportable(name: str) -> None:
    """One sentence for a backbone whose plugin does not implement the export hooks."""
    from .plugins import get_backbone

    cls = type(get_backbone(name))
    missing = [hook for hook in EXPORT_HOOKS if getattr(cls, hook) is getattr(Backbone, hook)]
    if missing:
        raise DyntieError(f"Backbone {name} cannot export: its plugin does not implement {', '.join(missing)} "
                          "(docs/plugins.md).")


def block_names(model: nn.Module, blocks: list[nn.Module]) -> list[str]:
    """The module name of each block (``transformer.h.3``): the prefix of its tensors in a state dict."""
    name_of = {id(m): n for n, m in model.named_modules()}
    return [name_of[id(b)] for b in blocks]


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _add_config_keys(folder: Path, keys: dict[str, Any]) -> None:
    file = folder / "config.json"
    if not file.is_file():
        raise DyntieError(f"The backbone's export wrote no config.json in {folder}; its export_model must "
                          "(docs/plugins.md).")
    config = json.loads(file.read_text())
    config.update(keys)
    file.write_text(json.dumps(config, indent=2) + "\n")


def _compact(full: Path, compact: Path, names: list[str], state: list[int], keys: dict[str, Any]) -> None:
    """The full folder with the tied blocks' tensors dropped: each independent block once."""
    compact.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(full.iterdir()):
        if f.suffix == ".safetensors":
            tensors.update(load_file(str(f)))
        elif not f.name.endswith(".safetensors.index.json"):
            shutil.copy2(f, compact / f.name)
    tied = tuple(f"{names[i]}." for i, r in enumerate(state) if r != i)
    kept = {k: v for k, v in tensors.items() if not k.startswith(tied)}
    save_file(kept, str(compact / COMPACT_WEIGHTS), metadata={"format": "pt"})
    _add_config_keys(compact, keys)


def _move_into_place(folder: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(folder, out)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# load_tied
# --------------------------------------------------------------------------------------------------


def load_tied(folder: str | os.PathLike[str]) -> nn.Module:
    """Load a ``dyntie export`` folder with real sharing: each tied block computes with its root's tensors
    (the same storage, counted once by ``model.parameters()``), as in training. The model is built by the
    backbone's library from the folder's config (so its peak memory is one full model while it loads), then
    the tie map is applied and the stored tensors loaded; it comes back in eval mode, its ``TieManager`` as
    ``model.dyntie_ties``. Works for compact and full exports."""
    from .plugins import get_backbone

    folder = Path(folder).expanduser()
    file = folder / "config.json"
    try:
        config = json.loads(file.read_text())
        name, state = config["dyntie_backbone"], [int(x) for x in config["dyntie_tie_map"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise DyntieError(f"{folder} is no dyntie export (its config.json has no dyntie_backbone and "
                          "dyntie_tie_map): pass a folder written by dyntie export.") from None
    backbone = get_backbone(name)
    model = backbone.load_exported(folder, weights=False)
    ties = TieManager(backbone.blocks(model), state, tied_grad=config.get("dyntie_tied_grad", "follow"))
    weights = folder / COMPACT_WEIGHTS
    tensors: dict[str, torch.Tensor] = {}
    for f in [weights] if weights.is_file() else sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    if config.get("dyntie_format") != "compact":  # a full export's tied blocks: copies, not needed
        names = block_names(model, ties.blocks)
        tied = tuple(f"{names[i]}." for i, r in enumerate(state) if r != i)
        tensors = {k: v for k, v in tensors.items() if not k.startswith(tied)}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    _, aliases = ckpt.dedupe(model.state_dict())  # tensors stored under another name (an embedding-tied head)
    missing = [k for k in missing if k not in aliases]
    if missing or unexpected:
        raise DyntieError(f"The weights in {folder} do not match its config ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected, such as {(missing or unexpected)[0]}): export the run "
                          "again.")
    model.dyntie_ties = ties
    return model.eval()
