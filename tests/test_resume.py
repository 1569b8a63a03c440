"""A stopped run continues with the command its stop message names, and ends as if it had never stopped.

Each case stops a run at a step boundary with SIGTERM (sent from inside the run at a chosen step, so the stop is
at the same place every time), takes the command out of the stop message, runs it, and compares every registry
table the run's seed fixes and its final weights with the same run trained without a stop. The run-dependent
variants (final-arch, replay) resume with their source run's tie history from their own checkpoint: the source
run is deleted from the registry before the resume.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dyntie_cli.runner.view import ProgressView
from dyntie_cli.variants import ABLATIONS
from tests.conftest import FIXTURES, MOVING_AGENT, invoke, rows
from tests.test_reproducible import logged

STOP_AT = 11  # not a logging step (every 5): where the run stops is its own step, not the last row it logged
SOURCE = ("train", "gpt2", "--preset", "gpt2-tiny", "--max-steps", "24", "--decide-every", "4", *MOVING_AGENT)


def _run_id(stdout: str) -> str:
    return next(line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith("run_id: "))


def stop_at(monkeypatch, step: int, variant: str | None = None) -> None:
    """SIGTERM this process when the run in it (of ``variant``, when given) finishes step ``step``, as a Ctrl-C
    or a `kill` would."""
    shown = ProgressView.__call__
    running: list[str] = []

    def view(self, event):
        shown(self, event)
        if event["type"] == "start":
            running[:] = [event["variant"]]
        if event["type"] == "step" and event["step"] == step and variant in (None, *running):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ProgressView, "__call__", view)


def stopped_then_resumed(runner, monkeypatch, db: Path, *args) -> tuple[str, str]:
    """Run ``args`` stopped at ``STOP_AT``; returns its run id and the command its stop message names."""
    with monkeypatch.context() as patch:
        stop_at(patch, STOP_AT)
        r = invoke(runner, *args)
    assert r.exit_code == 128 + signal.SIGTERM, r.output
    message = r.stderr.strip().splitlines()[-1]
    run_id = rows(db, "SELECT run_id FROM runs WHERE status = 'killed'")[0][0]
    head, command = message.split("`")[:2]
    assert head == f"Error: Run {run_id} was stopped at step {STOP_AT}; resume it with "
    return run_id, command


def resume_as_told(runner, command: str):
    words = shlex.split(command)
    assert words[0] == "dyntie"
    r = invoke(runner, *words[1:], "--quiet")
    assert r.exit_code == 0, r.output
    return r


def assert_same_run(db: Path, run_id: str, reference: str) -> None:
    """Every table the seed fixes, the run's record and its final weights are the reference run's."""
    assert logged(db, run_id) == logged(db, reference)
    record = "SELECT command, backbone, dataset, variant, status, config, parent_run_id, preset, seed, test_split, " \
             "metric, higher_is_better FROM runs WHERE run_id = ?"
    (got,), (want,) = rows(db, record, run_id), rows(db, record, reference)
    assert got[4] == "finished"
    assert got[:5] + got[6:] == want[:5] + want[6:]
    assert json.loads(got[5]) == json.loads(want[5])
    folders = [Path(rows(db, "SELECT out_dir FROM runs WHERE run_id = ?", r)[0][0]) / "checkpoint"
               for r in (run_id, reference)]
    weights = [load_file(str(folder / "model.safetensors")) for folder in folders]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A finished dynamic run whose schedule moves: what final-arch and replay are trained from."""
    from typer.testing import CliRunner

    folder = tmp_path_factory.mktemp("source")
    db = folder / "r.duckdb"
    r = invoke(CliRunner(), *SOURCE, "--db", db, "--out", folder / "runs", "--quiet")
    assert r.exit_code == 0, r.output
    return folder, db, _run_id(r.stdout)


#: the variants that take their tie history from the source run are checked on every run of the suite; the others
#: (which the resume rebuilds from their recorded settings alone) with -m slow
EVERY_ABLATION = [v if v in ("final-arch", "replay") else pytest.param(v, marks=pytest.mark.slow) for v in ABLATIONS]


@pytest.mark.parametrize("variant", EVERY_ABLATION)
def test_a_stopped_ablation_resumes_with_the_command_it_names(variant, source_run, runner, monkeypatch, tmp_path):
    folder, source_db, source = source_run
    db = tmp_path / "r.duckdb"
    db.write_bytes(source_db.read_bytes())  # the source run, in a registry of this test's own
    args = ("ablate", "--variant", variant, "--from-run", source, "--db", db, "--out", tmp_path / "runs", "--quiet")
    reference = _run_id(invoke(runner, *args).stdout)
    run_id, command = stopped_then_resumed(runner, monkeypatch, db, *args)
    assert command == f"dyntie ablate --resume {run_id} --db {db}"
    # the resume rebuilds the variant from its own checkpoint, not from the source run
    import duckdb

    con = duckdb.connect(str(db))
    for table in ("runs", "ties", "decisions", "metrics", "memory"):
        con.execute(f"DELETE FROM {table} WHERE run_id = ?", [source])
    con.close()
    resume_as_told(runner, command)
    assert_same_run(db, run_id, reference)


def test_a_stopped_finetune_resumes_with_the_command_it_names(runner, monkeypatch, tmp_path):
    db = tmp_path / "r.duckdb"
    args = ("finetune", "glue", "--task", "rte", "--preset", "bert-tiny", "--data-dir", FIXTURES / "glue",
            "--max-steps", "16", "--decide-every", "4", "--db", db, "--out", tmp_path / "runs", "--quiet")
    reference = _run_id(invoke(runner, *args).stdout)
    run_id, command = stopped_then_resumed(runner, monkeypatch, db, *args)
    assert command == f"dyntie finetune --resume {run_id} --db {db}"
    resume_as_told(runner, command)
    assert_same_run(db, run_id, reference)


def test_a_stopped_run_names_train_and_the_default_registry_needs_no_db(runner, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DYNTIE_DB", raising=False)
    args = ("train", "gpt2", "--preset", "gpt2-tiny", "--max-steps", "16", "--quiet")
    run_id, command = stopped_then_resumed(runner, monkeypatch, tmp_path / "dyntie.duckdb", *args)
    assert command == f"dyntie train --resume {run_id}"
    resume_as_told(runner, command)
    assert rows(tmp_path / "dyntie.duckdb", "SELECT status FROM runs")[0][0] == "finished"


def test_ablate_resume_refuses_what_would_start_another_run(runner, source_run, tmp_path):
    folder, db, source = source_run
    r = invoke(runner, "ablate", "--resume", source, "--from-run", source, "--db", db)
    assert r.exit_code == 2 and "drop --from-run and --backbone" in r.stderr
    r = invoke(runner, "ablate", "--resume", source, "--variant", "replay", "--db", db)
    assert r.exit_code == 2 and f"Run {source} is a dynamic run, not replay: drop --variant" in r.stderr
    r = invoke(runner, "ablate", "--db", db)
    assert r.exit_code == 2 and "--variant V" in r.stderr and "--resume RUN" in r.stderr


@pytest.mark.slow
def test_a_stopped_study_continues_its_stopped_final_arch_run(runner, monkeypatch, tmp_path):
    db = tmp_path / "r.duckdb"
    args = ("study", "gpt2", "--preset", "gpt2-tiny", "--max-steps", "24", "--decide-every", "4", *MOVING_AGENT,
            "--seeds", "0", "--variants", "dynamic,final-arch", "--db", db, "--out", tmp_path / "runs", "--quiet")
    with monkeypatch.context() as patch:
        stop_at(patch, STOP_AT, "final-arch")
        r = invoke(runner, *args)
    assert r.exit_code == 128 + signal.SIGTERM, r.output
    assert r.stderr.strip().splitlines()[-1].endswith("run the same command again to continue it.")
    (dynamic,), (stopped,) = (rows(db, "SELECT run_id FROM runs WHERE variant = ?", v)[0] for v in
                              ("dynamic", "final-arch"))
    assert rows(db, "SELECT status FROM runs WHERE run_id = ?", stopped) == [("killed",)]
    r = invoke(runner, *args)
    assert r.exit_code == 0, r.output
    assert rows(db, "SELECT status FROM runs WHERE run_id = ?", stopped) == [("finished",)]
    reference = _run_id(invoke(runner, "ablate", "--variant", "final-arch", "--from-run", dynamic, "--db", db,
                               "--out", tmp_path / "runs", "--quiet").stdout)
    assert logged(db, stopped) == logged(db, reference)
