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
