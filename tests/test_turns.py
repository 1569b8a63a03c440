"""Runs in turns (core/turns.py): real processes, one turn at a time, in rotation, and never stuck on one that
ends early or a referee that is gone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dyntie_cli.core.turns import deal_turns

PROGRAM = Path(__file__).with_name("turns_program.py")


def _start(tmp_path: Path, specs: list[tuple[str, int, list[str]]]) -> tuple[list, list[tuple[int, int]], Path]:
    """Start one turns_program per (name, turns, options); the referee's (read, write) fds for each."""
    log = tmp_path / "turns.log"
    procs, players = [], []
    for name, turns, options in specs:
        (child_read, parent_write), (parent_read, child_write) = os.pipe(), os.pipe()
        procs.append(subprocess.Popen([sys.executable, str(PROGRAM), str(child_read), str(child_write), name,
                                       str(turns), str(log), *options], pass_fds=(child_read, child_write)))
        os.close(child_read)
        os.close(child_write)
        players.append((parent_read, parent_write))
    return procs, players, log


def _finish(procs, players) -> list[int]:
    for fds in players:
        for fd in fds:
            os.close(fd)
    return [p.wait(timeout=60) for p in procs]


def _events(log: Path) -> list[tuple[str, str, float]]:
    rows = [line.split() for line in log.read_text().splitlines()]
    return sorted(((name, what, float(t)) for name, what, t in rows), key=lambda e: e[2])


def test_runs_take_one_turn_at_a_time_in_rotation(tmp_path):
    procs, players, log = _start(tmp_path, [("a", 4, []), ("b", 4, []), ("c", 4, [])])
    deal_turns(players)
    assert _finish(procs, players) == [0, 0, 0]
    turns = [(n, w) for n, w, _ in _events(log) if w in ("start", "end")]
    # each turn ends before the next one starts, and the runs take them in the order given, round and round
    assert turns == [(n, w) for _ in range(4) for n in "abc" for w in ("start", "end")]


def test_no_turn_is_dealt_before_every_run_has_set_up(tmp_path):
    procs, players, log = _start(tmp_path, [("a", 2, []), ("b", 2, ["sleep-first", "0.5"])])
    deal_turns(players)
    assert _finish(procs, players) == [0, 0]
    events = _events(log)
    b_ready = next(t for n, w, t in events if (n, w) == ("b", "ready"))
    first_start = next(t for _, w, t in events if w == "start")
    assert first_start > b_ready  # a's first step is not timed while b still loads its data


def test_a_run_that_ends_mid_turn_leaves_the_turns_and_the_others_finish(tmp_path):
    procs, players, log = _start(tmp_path, [("a", 3, []), ("b", 3, ["crash-at", "1"]), ("c", 3, [])])
    deal_turns(players)  # returns: the crashed run's end of file takes it out of the rotation
    assert _finish(procs, players) == [0, 3, 0]
    ends = [n for n, w, _ in _events(log) if w == "end"]
    assert ends.count("a") == ends.count("c") == 3 and ends.count("b") == 1


def test_without_a_referee_a_run_trains_alone(tmp_path):
    procs, players, log = _start(tmp_path, [("a", 3, [])])
    assert _finish(procs, players) == [0]  # the referee closed its pipes without dealing a turn
    assert [w for _, w, _ in _events(log)] == ["ready", *["start", "end"] * 3, "left"]
