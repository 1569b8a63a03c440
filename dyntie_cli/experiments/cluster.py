"""A study's cells as jobs of a Ray cluster (`dyntie study --executor ray`; docs/studies.md, "On a cluster").

Each cell (a variant on a seed) is one Ray task that trains the cell's job in a fresh interpreter (`dyntie job`, as
`--jobs N` does locally) with a registry and checkpoints of its own, in the cell's folder under the study's
output folder (``OUT/study-cells/NAME/VARIANT-seedSEED``: every machine of the cluster must see it, as it must see
``--out``). The driver merges a cell's registry into the study's (results/merge.py) when the cell finishes, so
the study's registry only ever holds finished cells, once each.

The folders are what makes a study resumable after its driver is killed: started again, the driver first merges
every cell that finished meanwhile, then for each cell that did not finish looks at the cell's own registry: a run
still training (its process alive on this machine) is waited for, a killed run with a checkpoint (or one whose
process is gone) is continued from it, anything else (a failure, a run killed before its first checkpoint) is
trained again from an empty folder. A cell's process does not outlive its Ray worker: Ray ends a dead driver's
workers with their processes, and a worker ended alone leaves its cell's process a SIGTERM (it checkpoints at its
next step); a cancelled task passes the SIGTERM on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..core.checkpoint import recover
from ..errors import DyntieError, UsageError
from ..results.db import read_registry
from ..results.liveness import running_here
from ..results.merge import merge_registries
from ..runner.children import STOPPED_EXIT

EXECUTORS = ("local", "ray")
REGISTRY = "registry.duckdb"
_CHECKPOINT_FILES = ("ties.json", "trainer.pt", "model.safetensors")


def has_checkpoint(out_dir: str | None) -> bool:
    """Whether a killed run left a checkpoint to resume from."""
    folder = Path(out_dir or "") / "checkpoint"
    if out_dir:
        recover(folder)  # one left under its old name by a kill in the middle of a swap
    return bool(out_dir) and all((folder / name).is_file() for name in _CHECKPOINT_FILES)


# Linux: the child asks for SIGTERM when its parent (the Ray worker) ends (PR_SET_PDEATHSIG, kept across exec), and
# ends at once if that parent has already gone
_TERM_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
                     "os.getppid() == int(sys.argv[1]) or sys.exit(143); "
                     "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


def train_cell(folder: str) -> int:
    """The Ray task: train the cell of ``folder`` (its ``job.json``) in a child interpreter; its exit status.
    The child receives SIGTERM when this worker ends, and when the task is cancelled."""
    cell = Path(folder)
    job = ["-m", "dyntie_cli", "job", str(cell / "job.json"), "--result", str(cell / "result.json")]
    if sys.platform == "linux":
        job = ["-c", _TERM_WITH_PARENT, str(os.getpid()), *job]
    with open(cell / "log.txt", "a") as log:
        child = subprocess.Popen([sys.executable, *job], stdout=log, stderr=subprocess.STDOUT)
        try:
            return child.wait()
        except KeyboardInterrupt:  # ray.cancel: the run checkpoints at its next step and is marked killed
            child.send_signal(signal.SIGTERM)
            return child.wait()


class RayCell:
    """A cell trained by a Ray task, seen by the study as a child process is (``poll``, ``stop``, ``stopped``,
    ``result``)."""

    def __init__(self, ref: Any, folder: Path, label: str) -> None:
        self.ref, self.folder, self.label = ref, folder, label
        self._code: int | None = None

    def poll(self) -> int | None:
        import ray

        if self._code is None:
            done, _ = ray.wait([self.ref], timeout=0)
            if done:
                try:
                    self._code = int(ray.get(done[0]))
                except (ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError):
                    self._code = 128 + signal.SIGTERM
                except ray.exceptions.RayError as error:
                    self._code = 1
                    (self.folder / "log.txt").open("a").write(f"Ray: {str(error).splitlines()[0]}\n")
        return self._code

    def stop(self) -> None:
        import ray

        if self._code is None:
            ray.cancel(self.ref)

    @property
    def stopped(self) -> bool:
        return self._code in STOPPED_EXIT

    def result(self) -> dict[str, Any]:
        return _cell_result(self.folder, self.label, self._code)


class FoundCell:
    """A cell whose run still trains in a process of its own (started by a driver that was killed): watched
    through the cell's registry until that process ends."""

    def __init__(self, folder: Path, label: str, run: dict[str, Any]) -> None:
        self.folder, self.label, self.run = folder, label, run
        self._code: int | None = None

    def poll(self) -> int | None:
        if self._code is None:
            run = latest_run(self.folder)
            if run is None or not running_here(run["status"], run["pid"], run["host"]):
                self._code = 0 if run is not None and run["status"] == "finished" else 1
        return self._code

    def stop(self) -> None:
        if self.poll() is None:
            os.kill(int(self.run["pid"]), signal.SIGTERM)

    @property
    def stopped(self) -> bool:
        return False

    def result(self) -> dict[str, Any]:
        run = latest_run(self.folder)
        if run is None or run["status"] != "finished":
            raise DyntieError(f"{self.label} failed: its run {self.run['run_id']} ended {run and run['status']}.")
        return {"run_id": run["run_id"], "validation": {}}


def _cell_result(folder: Path, label: str, code: int | None) -> dict[str, Any]:
    file = folder / "result.json"
    if code == 0 and file.exists():
        result = json.loads(file.read_text())
        if "refused" in result:
            raise DyntieError(f"{label} was refused: {result['refused']}")
        return result
    log = folder / "log.txt"
    lines = log.read_text().strip().splitlines() if log.exists() else []
    raise DyntieError(f"{label} failed: {lines[-1] if lines else '(no output)'}")


def latest_run(folder: Path) -> dict[str, Any] | None:
    """The last run of the cell's registry (status, pid, host, out_dir, config), or None."""
    db = folder / REGISTRY
    if not db.exists():
        return None
    with read_registry(db) as con:
        row = con.execute("SELECT run_id, status, pid, host, out_dir, config FROM runs ORDER BY started_at DESC, "
                          "run_id LIMIT 1").fetchone()
    return dict(zip(("run_id", "status", "pid", "host", "out_dir", "config"), row)) if row else None


class RayExecutor:
    """Starts the cells of study ``name`` as Ray tasks (``RAY_ADDRESS`` names a running cluster; without it a
    local one is started) and keeps their folders under ``root``; ``cpus`` and ``gpus``: what each cell asks of
    the cluster."""

    def __init__(self, root: Path, study_db: Path, *, cpus: float = 1, gpus: float = 0) -> None:
        try:
            import ray
        except ImportError:
            raise UsageError("--executor ray needs Ray: pip install 'dyntie[cluster]' (or pip install ray).") from None
        self.root, self.study_db, self.cpus, self.gpus = Path(root).absolute(), Path(study_db), cpus, gpus
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        self._task = ray.remote(train_cell)

    def folder(self, variant: str, seed: int) -> Path:
        return self.root / f"{variant}-seed{seed}"

    def collect(self) -> list[str]:
        """Merge every cell that finished into the study's registry (again: merging changes nothing then)."""
        merged = []
        for folder in sorted(self.root.glob("*-seed*")) if self.root.is_dir() else []:
            run = latest_run(folder)
            if run is not None and run["status"] == "finished":
                merge_registries([folder / REGISTRY], self.study_db)
                merged.append(run["run_id"])
        return merged

    def recover(self, variant: str, seed: int) -> tuple[dict[str, Any] | None, bool]:
        """What an unfinished cell left: (its run, whether that run still trains) for a run still training or
        killed with a checkpoint to continue from; (None, False) and an empty folder for anything else."""
        folder = self.folder(variant, seed)
        run = latest_run(folder)
        if run is None:
            return None, False
        if running_here(run["status"], run["pid"], run["host"]):
            return run, True
        if run["status"] != "finished" and has_checkpoint(run["out_dir"]):
            return run, False
        shutil.rmtree(folder, ignore_errors=True)  # failed, or killed before its first checkpoint: train again
        return None, False

    def start(self, variant: str, seed: int, payload: dict[str, Any], label: str,
              found: dict[str, Any] | None = None) -> RayCell | FoundCell:
        """Submit the cell (``payload`` as ``ChildRun`` takes it, with the cell's registry and output folder
        filled in), or watch the run that still trains it."""
        folder = self.folder(variant, seed)
        if found is not None:
            return FoundCell(folder, label, found)
        folder.mkdir(parents=True, exist_ok=True)
        payload = {**payload, "db": str(folder / REGISTRY)}
        if "job" in payload:
            payload["out"] = str(folder / "runs")
        (folder / "result.json").unlink(missing_ok=True)
        (folder / "job.json").write_text(json.dumps(payload))
        ref = self._task.options(num_cpus=self.cpus, num_gpus=self.gpus).remote(str(folder))
        return RayCell(ref, folder, label)

    def settle(self, variant: str, seed: int) -> None:
        """A cell finished: its run goes into the study's registry."""
        merge_registries([self.folder(variant, seed) / REGISTRY], self.study_db)
