"""CPU threads: the default follows the cores other processes leave free, --threads and OMP_NUM_THREADS choose
instead, and a run whose threads exceed the free cores warns once with the fix."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dyntie_cli.core import threads
from dyntie_cli.core.threads import ThreadPlan, ThreadWatch, free_cores, plan_threads
from tests.conftest import invoke
from tests.conftest import rows as _rows

TINY = ("train", "gpt2", "--preset", "gpt2-tiny", "--max-steps", "4", "--set", "train.eval_every=0",
        "--set", "train.test_items=512")


@pytest.mark.parametrize(("cores", "busy", "free"), [
    (2, 0.0, 2), (2, 0.4, 2), (2, 1.0, 1), (2, 1.6, 1), (2, 5.0, 1), (16, 3.2, 13), (16, 0.0, 16),
])
def test_free_cores_rounds_the_load_and_keeps_one(cores, busy, free):
    assert free_cores(cores, busy) == free


def test_the_default_is_the_free_cores_at_most_torchs_own(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(threads, "load_average", lambda: 1.1)  # one other busy process
    plan = plan_threads(None)
    assert (plan.threads, plan.chosen_by) == (1, "free cores")
    assert plan.warning() is None  # the default never exceeds what it found free
    monkeypatch.setattr(threads, "load_average", lambda: 0.2)
    assert plan_threads(None).threads == 2
    monkeypatch.setattr(threads, "load_average", lambda: None)  # a platform without a load average
    assert plan_threads(None).threads == 2


def test_an_explicit_choice_is_kept_and_warned_about(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "load_average", lambda: 1.3)
    plan = plan_threads(2)
    assert (plan.threads, plan.chosen_by) == (2, "--threads")
    text = plan.warning()
    assert "uses 2 CPU threads (chosen by --threads) but only 1 of 2 cores are free" in text
    assert "--threads 1" in text and "OMP_NUM_THREADS=1" in text and "\n" not in text
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what the test session runs with
    plan = plan_threads(None)
    assert (plan.threads, plan.chosen_by) == (torch.get_num_threads(), "OMP_NUM_THREADS")
    assert plan.warning() is None  # one thread always fits


class FakeClock:
    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def advance(self, seconds: float, cpu_rate: float) -> None:
        self.wall += seconds
        self.cpu += seconds * cpu_rate


def test_a_running_job_warns_once_when_another_job_starts():
    clock = FakeClock()
    load = {"value": 2.0}
    said: list[str] = []
    plan = ThreadPlan(2, "free cores", 2, 0.1)
    watch = ThreadWatch(plan, said.append, clock=lambda: clock.wall, cpu_clock=lambda: clock.cpu,
                        load=lambda: load["value"])
    with watch:
        assert torch.get_num_threads() == 2
        log = {"type": "log"}
        clock.advance(61, cpu_rate=2.0)  # alone: the load is this job's own two threads
        watch(log)
        assert said == []
        load["value"] = 3.0  # a busy process starts: this job gets 2 of 3 runnable threads' share
        clock.advance(30, cpu_rate=1.3)
        watch(log)
        assert said == []  # looked at no sooner than a minute after the last look
        clock.advance(31, cpu_rate=1.3)
        watch(log)
        assert len(said) == 1 and "only 1 of 2 cores are free" in said[0]
        clock.advance(120, cpu_rate=1.3)
        watch(log)
        assert len(said) == 1  # once
    assert torch.get_num_threads() == 1  # the session's thread count is back


def test_threads_flag_sets_the_runs_threads_and_records_them(runner, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    db = tmp_path / "r.duckdb"
    seen: list[int] = []
    original = threads.ThreadWatch.__call__

    def spy(self, event):
        seen.append(torch.get_num_threads())
        return original(self, event)

    monkeypatch.setattr(threads.ThreadWatch, "__call__", spy)
    r = invoke(runner, *TINY, "--threads", "2", "--db", db, "--out", tmp_path / "runs", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert seen and set(seen) == {2}
    assert torch.get_num_threads() == 1  # put back after the run
    (config,) = _rows(db, "SELECT config FROM runs")[0]
    assert json.loads(config)["threads"] == 2
    assert "Warning" not in r.stderr  # nothing else runs (load 0)


def test_a_run_with_more_threads_than_free_cores_warns_once_with_the_fix(runner, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.5, 1.5))
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    r = invoke(runner, *TINY, "--threads", "2", "--db", tmp_path / "r.duckdb", "--out", tmp_path / "runs",
               "--quiet")
    assert r.exit_code == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("Warning")]
    assert len(warnings) == 1 and "--threads 1" in warnings[0] and "OMP_NUM_THREADS=1" in warnings[0]


@pytest.mark.parametrize(("plan", "variable", "line"), [
    (ThreadPlan(1, "free cores", 2, 1.6), None,
     "CPU threads: 1 (the load average, 1.6, leaves 1 of 2 cores free; --threads N chooses)"),
    (ThreadPlan(2, "free cores", 2, 0.1), None,
     "CPU threads: 2 (the load average, 0.1, leaves all 2 cores free; --threads N chooses)"),
    (ThreadPlan(8, "free cores", 16, 0.3), None,
     "CPU threads: 8 (torch's default; the load average, 0.3, leaves all 16 cores free; --threads N chooses)"),
    (ThreadPlan(4, "free cores", 4, None), None,
     "CPU threads: 4 (torch's default; the load average is unknown here; --threads N chooses)"),
    (ThreadPlan(3, "--threads", 2, 0.0), None, "CPU threads: 3 (--threads)"),
    (ThreadPlan(1, "OMP_NUM_THREADS", 2, 0.0), "1", "CPU threads: 1 (OMP_NUM_THREADS=1)"),
])
def test_the_choice_is_said_in_one_line(plan, variable, line, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", variable or "")
    assert plan.describe() == line


def test_a_cpu_run_says_its_threads_first_and_quiet_says_nothing(runner, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    args = (*TINY, "--db", tmp_path / "r.duckdb", "--out", tmp_path / "runs")
    r = invoke(runner, *args, "--threads", "1")
    assert r.exit_code == 0, r.stderr
    assert r.stderr.splitlines()[0] == "CPU threads: 1 (--threads)"
    r = invoke(runner, *args, "--quiet")
    assert r.exit_code == 0 and "CPU threads" not in r.stderr


def test_bad_thread_counts_are_refused(runner, tmp_path):
    r = invoke(runner, *TINY, "--threads", "0", "--db", tmp_path / "r.duckdb")
    assert r.exit_code == 2 and "--threads must be at least 1" in r.stderr
    assert not (tmp_path / "r.duckdb").exists()
