"""Trackers: a run's rows, as the registry receives them, also sent to TensorBoard and MLflow (``train.report_to``).

The DuckDB registry stays the record. ``Trackers`` is a fan-out beside the ``RunWriter``: the writer hands it
each event (the run's start or resume, every row it buffers, each flush, the end) and each tracker writes them
to its local store -- TensorBoard event files, an MLflow tracking folder. A tracker that fails (its library is
missing, its folder cannot be written) says so once on stderr and is dropped; the run goes on.
``send_recorded`` replays a run the registry holds into a tracker (``dyntie export-metrics``). docs/trackers.md
is the user's page.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DyntieError, UsageError
from ..settings import tracker_list

#: the extra of dyntie that installs each tracker's library (``pip install 'dyntie[tensorboard]'``)
EXTRAS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
#: MLflow's experiment that every dyntie run is filed under
EXPERIMENT = "dyntie"
#: the tie-state picture is drawn again every this many decisions (and at the end)
PICTURE_EVERY = 25
#: MLflow's limits: a parameter's value in characters, parameters and metrics per batch call
_PARAM_CHARS, _PARAMS_PER_CALL, _METRICS_PER_CALL = 6000, 100, 1000
_MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED", "running": "RUNNING"}

Row = dict[str, Any]


def tracker_names(value: str) -> list[str]:
    """``train.report_to`` (or ``--to``) as a list of trackers: "none" is none, "tensorboard,mlflow" both."""
    try:
        return tracker_list(value)
    except ValueError as error:
        raise UsageError(f"{error}.") from None


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested settings tree as dotted keys (``train.lr``), lists as text: hyperparameters for the trackers."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = "" if value is None else value
        else:
            out[name] = json.dumps(value)
    return out


def scalars(table: str, row: Row) -> Iterable[tuple[str, float, int]]:
    """The (tag, value, step) of one registry row as the trackers show it: metrics as ``split/name``, memory as
    ``memory/column``, the tie state's counts as ``ties/...``, each decision's reward and agent figures as
    ``decisions/...``."""
    step = int(row["step"])
    if table == "metrics":
        if row["value"] is not None:
            yield f"{row['split']}/{row['name']}", float(row["value"]), step
        return
    skip = {"step", "device", "decision", "state", "action"}
    for column, value in row.items():
        if column not in skip and value is not None:
            yield f"{table}/{column}", float(value), step


_PALETTE = np.array([(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                     (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)], dtype=float)


def tie_picture(states: list[list[int]]) -> np.ndarray:
    """The tie states of a run as an RGB image (height x width x 3, uint8): a row per block, top to bottom, a
    column per decision, left to right. Blocks that share weights share a colour (their root's); the root itself,
    the block that trains, is drawn in full and the blocks tied to it paler."""
    blocks, decisions = len(states[0]), len(states)
    grid = np.asarray(states).T  # blocks x decisions: each cell its root
    colours = _PALETTE[grid % len(_PALETTE)]
    independent = grid == np.arange(blocks)[:, None]
    colours = np.where(independent[..., None], colours, 255 - 0.45 * (255 - colours))
    cell_h = max(2, min(16, 256 // blocks))
    cell_w = max(1, min(16, 1024 // decisions))
    image = np.repeat(np.repeat(colours, cell_h, axis=0), cell_w, axis=1)
    return image.round().astype(np.uint8)


class Tracker:
    """One tracker's side of the fan-out. ``start`` receives the run (id, command, backbone, dataset, variant,
    config, headline), ``resume`` a resumed run's id, the step it resumes from and its registry."""

    name = ""

    def start(self, run: dict[str, Any]) -> None: ...

    def resume(self, run_id: str, step: int, db: Path) -> None: ...

    def row(self, table: str, row: Row) -> None: ...

    def flush(self) -> None: ...

    def finish(self, status: str) -> None: ...


class _TieStates:
    """The states a run's ``ties`` rows carry, for the picture."""

    def __init__(self) -> None:
        self.states: list[list[int]] = []
        self.last_step = 0

    def read(self, db: Path, run_id: str, step: int) -> None:
        """A resumed run's states up to its checkpoint, so that its picture shows the whole run."""
        from .db import read_registry

        with read_registry(db) as con:
            self.states = [[int(s) for s in state] for (state,) in con.execute(
                "SELECT state FROM ties WHERE run_id = ? AND step <= ? ORDER BY decision", [run_id, step]).fetchall()]
        self.last_step = step

    def add(self, row: Row) -> bool:
        """Keep a row's state; True when the picture is due again."""
        self.states.append([int(s) for s in row["state"]])
        self.last_step = int(row["step"])
        return len(self.states) % PICTURE_EVERY == 0


def _import(module: str, tracker: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise DyntieError(f"its library is not installed: pip install 'dyntie[{EXTRAS[tracker]}]'") from None


class TensorBoardTracker(Tracker):
    """Event files in ``folder/RUN_ID`` (``tensorboard --logdir folder`` lists the runs by id): every row as a
    scalar, the settings as hyperparameters (the HPARAMS tab) and as text, the tie state as an image."""

    name = "tensorboard"

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.writer = None
        self.ties = _TieStates()

    def _open(self, run_id: str, purge_step: int | None = None) -> None:
        tensorboard = _import("torch.utils.tensorboard", "tensorboard")
        self.writer = tensorboard.SummaryWriter(str(self.folder / run_id), purge_step=purge_step)

    def start(self, run: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        self._open(run["run_id"], purge_step=0)  # a run sent again replaces what was sent
        metric = run.get("metric") or "loss"
        params = flat({k: run[k] for k in ("command", "backbone", "dataset", "variant")} | run["config"])
        for summary in hparams(params, {f"validation/{metric}": math.nan, f"test/{metric}": math.nan}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("settings", "```\n" + json.dumps(run["config"], indent=2, sort_keys=True) + "\n```")

    def resume(self, run_id: str, step: int, db: Path) -> None:
        self._open(run_id, purge_step=step + 1)  # what the killed process wrote after its checkpoint goes
        self.ties.read(db, run_id, step)

    def row(self, table: str, row: Row) -> None:
        for tag, value, step in scalars(table, row):
            self.writer.add_scalar(tag, value, step)
        if table == "ties" and self.ties.add(row):
            self._picture()

    def _picture(self) -> None:
        if self.ties.states:
            self.writer.add_image("ties/state", tie_picture(self.ties.states), self.ties.last_step,
                                  dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def finish(self, status: str) -> None:
        self._picture()
        self.writer.add_text("status", status)
        self.writer.close()


class MLflowTracker(Tracker):
    """An MLflow run in experiment ``dyntie`` of the tracking store ``uri`` (a local folder by default), named and
    tagged with the dyntie run id: the settings as parameters, every row as a metric, the tie state as the
    artifact ``ties.png``, and the run's end as its status."""

    name = "mlflow"

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.client = None
        self.mlflow_run = ""
        self.pending: list[Any] = []
        self.ties = _TieStates()

    def _connect(self):
        if self.uri.startswith("file:"):
            # MLflow 3 keeps its folder store for local use, behind this switch (no server, no database)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        tracking = _import("mlflow.tracking", "mlflow")
        self.client = tracking.MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        return experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)

    def start(self, run: dict[str, Any]) -> None:
        from mlflow.entities import Param

        experiment = self._connect()
        for earlier in self._runs_of(experiment, run["run_id"]):  # a run sent again replaces what was sent
            self.client.delete_run(earlier.info.run_id)
        tags = {f"dyntie.{k}": str(run[k]) for k in ("run_id", "command", "backbone", "dataset", "variant")}
        self.mlflow_run = self.client.create_run(experiment, run_name=run["run_id"], tags=tags).info.run_id
        params = [Param(k, str(v)[:_PARAM_CHARS]) for k, v in flat(run["config"]).items()]
        for i in range(0, len(params), _PARAMS_PER_CALL):
            self.client.log_batch(self.mlflow_run, params=params[i:i + _PARAMS_PER_CALL])

    def _runs_of(self, experiment: str, run_id: str) -> list[Any]:
        return self.client.search_runs([experiment], f"tags.`dyntie.run_id` = '{run_id}'")

    def resume(self, run_id: str, step: int, db: Path) -> None:
        self.ties.read(db, run_id, step)
        experiment = self._connect()
        found = self._runs_of(experiment, run_id)
        if not found:  # trained without this tracker until now: a run of its own from here
            run = self.client.create_run(experiment, run_name=run_id, tags={"dyntie.run_id": run_id})
            self.mlflow_run = run.info.run_id
            return
        self.mlflow_run = found[0].info.run_id
        self.client.update_run(self.mlflow_run, status="RUNNING")

    def row(self, table: str, row: Row) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(tag, value, now, step) for tag, value, step in scalars(table, row)]
        if table == "ties":
            self.ties.add(row)

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:_METRICS_PER_CALL], self.pending[_METRICS_PER_CALL:]
            self.client.log_batch(self.mlflow_run, metrics=batch)

    def finish(self, status: str) -> None:
        self.flush()
        if self.ties.states:
            self.client.log_image(self.mlflow_run, tie_picture(self.ties.states), "ties.png")
        if status == "running":  # a run sent while it trains: as far as the registry holds it
            self.client.update_run(self.mlflow_run, status="RUNNING")
        else:
            self.client.set_terminated(self.mlflow_run, _MLFLOW_STATUS.get(status, "FAILED"))


def _warn(message: str) -> None:
    print(f"dyntie: {message}", file=sys.stderr, flush=True)


class Trackers:
    """The fan-out a ``RunWriter`` calls with each event (``start``, ``resume``, ``row``, ``flush``, ``finish``).
    A tracker whose call raises is dropped after one warning (``warn``); the others and the run go on. ``strict``:
    the first failure is one sentence instead (a replay, where nothing else goes on)."""

    def __init__(self, trackers: Iterable[Tracker], warn: Callable[[str], None] = _warn, *,
                 strict: bool = False) -> None:
        self.trackers = list(trackers)
        self.warn = warn
        self.strict = strict

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def __call__(self, event: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, event)(*args)
            except Exception as error:  # a tracker never stops the run it reports
                self.trackers.remove(tracker)
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                if self.strict:
                    raise DyntieError(f"The {tracker.name} tracker failed ({reason}); fix that and send the run "
                                      "again.") from error
                self.warn(f"the {tracker.name} tracker stopped ({reason}); the run goes on, and the registry keeps "
                          f"every row (dyntie export-metrics sends them later).")


def mlflow_uri(folder: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set (a server, a database), else the folder store ``folder/mlruns``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path(folder).expanduser().resolve() / "mlruns").as_uri()


def make_trackers(names: Iterable[str], folder: Path, *, strict: bool = False) -> Trackers:
    """The trackers ``names`` writing under ``folder``: TensorBoard in ``folder/tensorboard``, MLflow in
    ``folder/mlruns`` (or ``MLFLOW_TRACKING_URI``)."""
    made: list[Tracker] = []
    for name in names:
        made.append(TensorBoardTracker(Path(folder) / "tensorboard") if name == "tensorboard"
                    else MLflowTracker(mlflow_uri(folder)))
    return Trackers(made, strict=strict)


def for_run(train: Any, out: Path) -> Trackers | None:
    """The trackers a run's ``train`` settings ask for (``report_to``, ``tracker_dir``; the default folder is
    ``out``, the run's --out), or None."""
    names = tracker_names(train.report_to)
    if not names:
        return None
    return make_trackers(names, Path(train.tracker_dir).expanduser() if train.tracker_dir else out)


# --------------------------------------------------------------------------------------------------
# dyntie export-metrics: a recorded run, replayed
# --------------------------------------------------------------------------------------------------

_ORDER = ("metrics", "memory", "ties", "decisions")


def send_recorded(db: Path, run_id: str, names: list[str], folder: Path | None = None) -> tuple[str, int, Path]:
    """Send run ``run_id`` of registry ``db`` -- its settings, every row, its tie states and its status -- to the
    trackers ``names``, under ``folder`` (default: where the run's own trackers would have written). Returns the
    full run id, the rows sent and the folder. A tracker that fails is one sentence."""
    from .db import read_registry, resolve_run_id
    from .writer import ROW_COLUMNS

    with read_registry(db) as con:
        full = resolve_run_id(con, run_id, db)
        info = con.execute("SELECT command, backbone, dataset, variant, status, config, out_dir, metric "
                           "FROM runs WHERE run_id = ?", [full]).fetchone()
        rows = {table: [dict(zip(ROW_COLUMNS[table], r, strict=True)) for r in con.execute(
            f"SELECT {', '.join(ROW_COLUMNS[table])} FROM {table} WHERE run_id = ? ORDER BY step", [full]).fetchall()]
            for table in _ORDER}
    command, backbone, dataset, variant, status, config, out_dir, metric = info
    config = json.loads(config) if isinstance(config, str) else config
    if folder is None:
        chosen = (config.get("train") or {}).get("tracker_dir")
        folder = Path(chosen) if chosen else Path(out_dir).parent if out_dir else Path("runs")
    folder = Path(folder).expanduser()
    fanout = make_trackers(names, folder, strict=True)
    fanout("start", {"run_id": full, "command": command, "backbone": backbone, "dataset": dataset,
                     "variant": variant, "config": config, "metric": metric})
    for table in _ORDER:
        for row in rows[table]:
            fanout("row", table, row)
    fanout("flush")
    fanout("finish", status)
    return full, sum(len(r) for r in rows.values()), folder
