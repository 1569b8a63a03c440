"""Shared fixtures: a session-wide tokenizer/data cache and a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def dyntie_cache(tmp_path_factory) -> Path:
    """One tokenizer/token cache for the whole session (the tiny BPE is trained once), offline hub, one thread."""
    cache = tmp_path_factory.mktemp("dyntie-cache")
    keys = ("DYNTIE_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "OMP_NUM_THREADS")
    old = {k: os.environ.get(k) for k in keys}
    # tiny models gain nothing from a second thread, and one thread per process keeps the subprocess tests
    # from fighting over two cores
    os.environ.update(DYNTIE_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    yield cache
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# The default agent keeps a block's tie unless the gain is clear, so a 40-step test run may never move; runs
# whose tests need a schedule that changes drop the keep bias and bonus and let the greedy choice tie trained blocks.
MOVING_AGENT = ("--set", "agent.keep_bias=0", "--set", "agent.keep_bonus=0", "--set", "agent.keep_trained=false")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def rows(db: Path, sql: str, *params):
    """Rows of a query on a registry file, opened read-only and closed again."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def invoke(runner: CliRunner, *args: str):
    from dyntie_cli.app import app

    return runner.invoke(app, [str(a) for a in args])


FIXTURES = Path(__file__).parent / "fixtures"

#: the command line of a tiny run of each built-in backbone (4 blocks each), for tests that need a trained run
TINY_RUNS = {
    "gpt2": ["train", "gpt2", "--preset", "gpt2-tiny"],
    "llama": ["train", "llama", "--preset", "llama-tiny"],
    "glue": ["finetune", "glue", "--task", "rte", "--preset", "bert-tiny", "--data-dir", FIXTURES / "glue"],
    "vit": ["train", "vit", "--preset", "vit-tiny", "--dataset", "digits"],
}


def tiny_run(runner: CliRunner, folder: Path, backbone: str, *extra) -> tuple[Path, str]:
    """Train a tiny run of ``backbone`` into ``folder`` (registry ``r.duckdb``, checkpoints ``runs``); returns
    the registry and the run id."""
    db = folder / "r.duckdb"
    result = invoke(runner, *TINY_RUNS[backbone], "--db", db, "--out", folder / "runs", "--quiet", *extra)
    assert result.exit_code == 0, result.stderr or result.output
    run_id = next(line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("run_id: "))
    return db, run_id


#: the tie state of ``tiny_runs``: a fixed mix of independent and tied blocks (no decision in 8 steps at k = 100)
TINY_STATE = [0, 1, 0, 1]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """One finished tiny run of each built-in backbone, 8 steps, tie state ``TINY_STATE``: (registry, run id)."""
    out = {}
    for name in TINY_RUNS:
        folder = tmp_path_factory.mktemp(f"tiny-{name}")
        out[name] = tiny_run(CliRunner(), folder, name, "--max-steps", 8, "--decide-every", 100,
                             "--initial-state", ",".join(map(str, TINY_STATE)))
    return out


@pytest.fixture(scope="session")
def tiny_exports(tiny_runs, tmp_path_factory) -> dict[str, dict]:
    """Each tiny run exported full and compact (the folders and what the command printed), and the run's own
    outputs on the export's fixed batch (computed through dyntie, tied)."""
    from dyntie_cli.export import fixed_batch, load_run_model

    out = {}
    for name, (db, run_id) in tiny_runs.items():
        folder = tmp_path_factory.mktemp(f"export-{name}")
        entry: dict = {}
        for fmt in ("full", "compact"):
            result = invoke(CliRunner(), "export", run_id, "--out", folder / fmt, "--format", fmt, "--db", db)
            assert result.exit_code == 0, result.stderr or result.output
            entry[fmt], entry[f"{fmt}_stdout"] = folder / fmt, result.stdout
        rm = load_run_model(db, run_id)
        entry["batch"] = fixed_batch(rm.data)
        with torch.no_grad():
            entry["outputs"] = rm.backbone.outputs(rm.model, entry["batch"])
        entry["run_model"] = rm
        out[name] = entry
    return out


@pytest.fixture(scope="session")
def twelve_block_runs(tmp_path_factory):
    """Two finished 12-block dynamic runs with the shared network, and a grow run (no agent) beside them: the
    earlier runs that warm starts learn from."""
    from tests.test_shared_agent import _train

    tmp = tmp_path_factory.mktemp("twelve")
    db, out, runner = tmp / "r.duckdb", tmp / "runs", CliRunner()
    ids = [_train(runner, db, out, "--set", "model.n_layer=12", "--max-steps", "30", "--decide-every", "3",
                  "--seed", str(seed)) for seed in (0, 1)]
    _train(runner, db, out, "--set", "model.n_layer=12", "--max-steps", "12", "--variant", "grow")
    return db, out, ids
