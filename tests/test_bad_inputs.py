"""Bad input gets one sentence and a non-zero exit, checked before work starts where it can be: what a resume may
change, corrupt checkpoints, folders that cannot be written, out-of-range numbers, empty names, damaged files; and
what holds up a run (a registry another process holds, a checkpoint replaced while it is read) does not fail it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dyntie_cli.core import checkpoint as ckpt
from dyntie_cli.core.loop import Job
from dyntie_cli.errors import DyntieError
from dyntie_cli.results.db import lock_path
from dyntie_cli.runner.jobs import Launch, run_job
from dyntie_cli.runner.settings_source import SettingsSource, new_settings
from tests.conftest import invoke, rows

TINY = ("train", "gpt2", "--preset", "gpt2-tiny")


def train_tiny(folder: Path, listen, *, steps: int = 8) -> None:
    """Train a gpt2-tiny run in ``folder`` (registry r.duckdb, checkpoints runs/) with ``listen`` hearing its
    events; a train log every 2 steps, a checkpoint only at the end."""
    backbone, settings = new_settings("gpt2", SettingsSource(
        "gpt2-tiny", flags=(("train.max_steps", steps),), sets=(("train.log_every", 2), ("train.eval_every", 100))))
    run_job(backbone, Job(settings), Launch(folder / "r.duckdb", folder / "runs", quiet=True), print_summary=False,
            listen=listen)


def stopped_run(folder: Path, *, steps: int = 8, at: int = 4) -> tuple[Path, str]:
    """A gpt2-tiny run stopped by SIGTERM at step ``at``: checkpointed there and marked killed."""

    def stop(event) -> None:
        if event["type"] == "log" and event["step"] == at:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler: stop at this step boundary

    with pytest.raises(DyntieError, match=f"was stopped at step {at}; resume it with"):
        train_tiny(folder, stop, steps=steps)
    db = folder / "r.duckdb"
    (run_id,) = [r[0] for r in rows(db, "SELECT run_id FROM runs")]
    return db, run_id


def registry_state(db: Path, run_id: str) -> tuple:
    """Everything the registry holds of a run, to show that a refusal wrote nothing."""
    tables = tuple(rows(db, f"SELECT * FROM {t} WHERE run_id = ? ORDER BY ALL", run_id)
                   for t in ("metrics", "memory", "ties", "decisions"))
    return rows(db, "SELECT status, ended_at, heartbeat_at, error, config FROM runs WHERE run_id = ?", run_id), tables


# --- resume means resume --------------------------------------------------------------------------------------


def test_resume_of_a_finished_run_is_refused_and_writes_nothing(runner, tiny_runs):
    db, run_id = tiny_runs["gpt2"]
    before = registry_state(db, run_id)
    result = invoke(runner, "train", "--resume", run_id, "--db", db)
    assert result.exit_code == 1
    assert result.stderr == (f"Error: Run {run_id} finished at step 8; nothing to resume (`dyntie report --table paper "
                             f"--run {run_id}` shows its results).\n")
    assert registry_state(db, run_id) == before


@pytest.mark.parametrize("flags, named", [
    (("--seed", 1), "--seed cannot change it; drop it"),
    (("--preset", "gpt2-cpu", "--set", "train.lr=1", "--seed", 3), "--preset, --set and --seed cannot change it; drop them"),
    (("--out", "elsewhere"), "--out cannot change it; drop it"),
])
def test_flags_a_resume_cannot_honour_are_refused_in_one_sentence(runner, tiny_runs, flags, named):
    db, run_id = tiny_runs["gpt2"]
    result = invoke(runner, "train", "--resume", run_id, *flags, "--db", db)
    assert result.exit_code == 2
    assert result.stderr == (f"Error: --resume {run_id} continues the run with the settings it was recorded with, so "
                             f"{named} or train a new run (a resume takes --max-steps, --threads, --quiet, --db and "
                             "--force).\n")


def test_a_resume_extends_a_run_records_its_new_length_and_refuses_to_end_it_before_its_checkpoint(runner, tmp_path):
    db, run_id = stopped_run(tmp_path)
    before = registry_state(db, run_id)
    short = invoke(runner, "train", "--resume", run_id, "--max-steps", 3, "--db", db)
    assert short.exit_code == 2
    assert short.stderr == (f"Error: Run {run_id}'s checkpoint is at step 4; --max-steps 3 would end it before that: "
                            "give at least 4.\n")
    assert registry_state(db, run_id) == before
    longer = invoke(runner, "train", "--resume", run_id, "--max-steps", 10, "--db", db, "--quiet")
    assert longer.exit_code == 0, longer.stderr
    (status, config), = rows(db, "SELECT status, config FROM runs")
    assert status == "finished" and json.loads(config)["train"]["max_steps"] == 10
    assert rows(db, "SELECT max(step) FROM metrics WHERE split = 'test'")[0][0] == 10


def test_a_run_killed_after_training_all_its_steps_is_not_extended(runner, tmp_path):
    db, run_id = stopped_run(tmp_path, steps=4, at=4)  # checkpointed at its last step
    result = invoke(runner, "train", "--resume", run_id, "--max-steps", 6, "--db", db)
    assert result.exit_code == 2
    assert result.stderr == (f"Error: Run {run_id} had trained all its 4 steps when it was killed; resume it without "
                             "--max-steps to record its end, and train a new run for more steps.\n")


# --- corrupt checkpoints ----------------------------------------------------------------------------------------


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


@pytest.mark.parametrize("name, damage, problem", [
    ("model.safetensors", _truncate, "Error while deserializing header: incomplete metadata, file not fully covered"),
    ("trainer.pt", lambda f: f.write_bytes(b"not a torch file" * 8), "not a whole torch archive"),
    ("ties.json", lambda f: f.write_text('{"state": [0, 1'),
     "not a tie map: Expecting ',' delimiter: line 1 column 16 (char 15)"),
])
def test_a_resume_from_a_corrupt_checkpoint_file_names_it_before_loading_anything(runner, tmp_path, monkeypatch, name,
                                                                                 damage, problem):
    db, run_id = stopped_run(tmp_path)
    file = tmp_path / "runs" / run_id / "checkpoint" / name
    damage(file)
    before = registry_state(db, run_id)
    from backbones import gpt2

    def no_data(*args, **kwargs):
        raise AssertionError("the data loaded before the checkpoint was checked")

    monkeypatch.setattr(gpt2.GPT2Backbone, "load_data", no_data)
    result = invoke(runner, "train", "--resume", run_id, "--db", db)
    assert result.exit_code == 1
    assert result.stderr == (f"Error: The checkpoint file {file} is corrupt ({problem}); the run cannot continue from "
                             "it: restore the file from a copy, or train the run again without --resume.\n")
    assert registry_state(db, run_id) == before


def test_a_checkpoint_read_while_a_run_replaces_it_is_one_checkpoint(tmp_path):
    blocks = nn.ModuleList(nn.Linear(3, 3) for _ in range(2))
    optimizer = torch.optim.SGD(blocks.parameters())
    folder = tmp_path / "checkpoint"

    def save(value: float) -> None:
        with torch.no_grad():
            for p in blocks.parameters():
                p.fill_(value)
        ckpt.save_checkpoint(folder, model=blocks, ties_map={"state": [0, int(value)]}, optimizer=optimizer,
                             trainer={"step": int(value)})

    save(0)
    with ckpt.snapshot(folder) as files:
        save(1)  # a newer checkpoint moves into place: the old folder is renamed away and removed
        assert not (tmp_path / "checkpoint.old").exists()
        assert ckpt.load_tie_map(files)["state"] == [0, 0]
        ckpt.load_model_weights(files, blocks)
        assert all(bool((p == 0).all()) for p in blocks.parameters())
    # many swaps while reading: each read sees one checkpoint, never the tie map of one and the weights of another
    stop = threading.Event()

    def keep_saving() -> None:
        value = 0
        while not stop.is_set():
            value = 1 - value
            save(value)

    saver = threading.Thread(target=keep_saving)
    saver.start()
    try:
        for _ in range(30):
            with ckpt.snapshot(folder) as files:
                state = ckpt.load_tie_map(files)["state"][1]
                weights = load_file(str(files / "model.safetensors"))
            assert all(bool((t == state).all()) for t in weights.values())
    finally:
        stop.set()
        saver.join()


def test_a_kill_between_the_two_renames_of_a_checkpoint_leaves_the_last_one_to_resume_from(tmp_path):
    folder = tmp_path / "checkpoint"
    folder.with_name("checkpoint.old").mkdir()
    (folder.with_name("checkpoint.old") / "ties.json").write_text('{"state": [0]}')
    ckpt.recover(folder)  # the previous checkpoint back in place
    assert ckpt.load_tie_map(folder) == {"state": [0]} and not folder.with_name("checkpoint.old").exists()


# --- folders, registries and names ---------------------------------------------------------------------------


def test_an_out_folder_that_cannot_be_written_is_refused_before_data_loads(runner, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("")
    db = tmp_path / "r.duckdb"
    result = invoke(runner, *TINY, "--out", file / "runs", "--db", db)
    assert result.exit_code == 2
    assert result.stderr == (f"Error: --out {file / 'runs'} cannot be written (a file is in its path); pass a folder "
                             "this user can write.\n")
    assert not db.exists()  # refused before the run was recorded


def test_export_into_a_folder_that_cannot_be_written_is_refused(runner, tiny_runs, tmp_path):
    db, run_id = tiny_runs["gpt2"]
    file = tmp_path / "a-file"
    file.write_text("")
    result = invoke(runner, "export", run_id, "--out", file / "export", "--db", db)
    assert result.exit_code == 2
    assert result.stderr == (f"Error: --out {file / 'export'} cannot be written (a file is in its path); pass a "
                             "folder this user can write.\n")


@pytest.mark.parametrize("args", [("export", "", "--out", "x"), ("train", "--resume", "")])
def test_an_empty_run_id_is_refused(runner, tiny_runs, args):
    db, _ = tiny_runs["gpt2"]
    result = invoke(runner, *args, "--db", db)
    assert result.exit_code == 2 and result.stderr == (
        "Error: The run id is empty; pass a run id or a unique prefix of one (`dyntie report --table runs` lists "
        "them).\n")


@pytest.mark.parametrize("command", [("report", "--table", "runs"), TINY])
def test_an_empty_db_path_is_refused(runner, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    result = invoke(runner, *command, "--db", "")
    assert result.exit_code == 2
    assert result.stderr == "Error: --db is empty; pass the registry's file path (or leave --db out for " \
                            "./dyntie.duckdb).\n"
    assert not list(tmp_path.iterdir())


def test_a_truncated_registry_is_called_truncated(runner, tiny_runs, tmp_path):
    db, _ = tiny_runs["gpt2"]
    cut = tmp_path / "cut.duckdb"
    cut.write_bytes(db.read_bytes()[:1000])
    result = invoke(runner, "report", "--table", "runs", "--db", cut)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: The registry {cut} is truncated or corrupt (")
    assert result.stderr.endswith("); restore it from a copy, or pass --db with another path to start a new one.\n")


def test_a_data_dir_that_is_a_file_is_called_a_file(runner, tmp_path):
    file = tmp_path / "wiki.txt"
    file.write_text("text")
    result = invoke(runner, *TINY, "--data-dir", file, "--db", tmp_path / "r.duckdb", "--out", tmp_path / "runs")
    assert result.exit_code == 1
    assert result.stderr == (f"Error: Data folder {file} is a file, not a folder: pass --data-dir DIR with the "
                             "wikitext-2 files.\n")


@pytest.mark.parametrize("content, reason", [
    ("garbage", "not JSON: Expecting value: line 1 column 1 (char 0)"),
    ('{"threads": 2}', "it names no job to train or run to resume, and no registry"),
    ('{"job": {}, "db": "r.duckdb", "out": "runs"}', "no 'settings'"),
])
def test_a_job_file_that_is_not_one_is_refused(runner, tmp_path, content, reason):
    job = tmp_path / "job.json"
    job.write_text(content)
    result = invoke(runner, "job", job, "--result", tmp_path / "result.json")
    assert result.exit_code == 1
    assert result.stderr == (f"Error: {job} is not a dyntie job file ({reason}); dyntie writes them itself when "
                             "`dyntie bench` or `dyntie study --jobs N` trains a run in a process of its own.\n")


# --- numbers out of range --------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (("--set", "data.batch_size=1000000000"), "data.batch_size must be at most 65536, not 1000000000."),
    (("--seed", 2147483648), "seed (--seed) must be at most 2147483647, not 2147483648."),
    (("--max-steps", 2**31), "train.max_steps (--max-steps) must be at most 2147483647, not 2147483648."),
    (("--set", "agent.hidden=100000000"), "agent.hidden must be at most 65536, not 100000000."),
    (("--set", "train.lr=Infinity"), "train.lr must be a finite number, not inf."),
])
def test_numbers_no_library_or_registry_column_can_hold_are_refused_before_anything_runs(runner, tmp_path, args,
                                                                                        message):
    db = tmp_path / "r.duckdb"
    result = invoke(runner, *TINY, *args, "--db", db, "--out", tmp_path / "runs")
    assert result.exit_code == 2 and result.stderr == f"Error: {message}\n"
    assert not db.exists()


def test_generate_is_bounded(runner, tiny_runs):
    db, run_id = tiny_runs["gpt2"]
    result = invoke(runner, "generate", run_id, "--prompt", "The", "-n", 1_000_000_000, "--db", db)
    words = " ".join(result.output.replace("│", " ").split())  # Rich draws the usage error in a box
    assert result.exit_code == 2 and "-n': Input should be less than or equal to 2048" in words, result.output


# --- what holds a run up does not fail it --------------------------------------------------------------------


HOLDER = ("import sys\nfrom dyntie_cli.results.db import read_registry\nwith read_registry(sys.argv[1]):\n"
          "    print('held', flush=True)\n    sys.stdin.readline()\n")


def test_a_reader_holding_the_registry_while_a_run_trains_does_not_fail_it(tmp_path):
    db, out = tmp_path / "r.duckdb", tmp_path / "runs"
    backbone, settings = new_settings("gpt2", SettingsSource(
        "gpt2-tiny", flags=(("train.max_steps", 16), ("ties.decide_every", 4)),
        sets=(("train.flush_every_s", 0.0), ("train.eval_every", 4), ("train.log_every", 2))))
    holder: list[subprocess.Popen] = []

    def hold_at_the_first_validation(event) -> None:
        if event["type"] == "eval" and not holder:
            holder.append(subprocess.Popen([sys.executable, "-c", HOLDER, str(db)], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True))
            assert holder[0].stdout.readline().strip() == "held"
            threading.Timer(4.0, holder[0].stdin.close).start()  # lets go 4 s later, while the run trains

    result = run_job(backbone, Job(settings), Launch(db, out, quiet=True), print_summary=False,
                     listen=hold_at_the_first_validation)
    holder[0].wait(timeout=60)
    assert result.status == "finished"
    (status,), = rows(db, "SELECT status FROM runs")
    assert status == "finished"
    counts = [rows(db, f"SELECT count(*) FROM {t}")[0][0] for t in ("ties", "decisions", "memory")]
    assert counts == [4, 3, 8]  # decisions at steps 4, 8, 12 and the initial state; a memory row every 2 steps


def test_a_double_ctrl_c_before_the_first_checkpoint_says_there_is_none(tmp_path):
    def interrupt(event) -> None:
        if event["type"] == "log":
            raise KeyboardInterrupt

    with pytest.raises(DyntieError) as stopped:
        train_tiny(tmp_path, interrupt)
    assert str(stopped.value).endswith("was interrupted at step 2; it has no checkpoint yet, so it cannot be resumed: "
                                       "start it again.")
    assert stopped.value.exit_code == 130
    assert rows(tmp_path / "r.duckdb", "SELECT status FROM runs") == [("killed",)]


def _holder(db: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _release_once_waited_for(holder: subprocess.Popen, db: Path) -> None:
    """Let the registry go 2 s after a process began to wait for its lock (the kernel's lock table lists waiters
    with '->'), or after 120 s."""
    inode = str(lock_path(db).stat().st_ino)
    for _ in range(1200):
        if any("->" in line and line.split()[-3].endswith(f":{inode}")
               for line in Path("/proc/locks").read_text().splitlines()):
            time.sleep(2.0)
            break
        time.sleep(0.1)
    holder.stdin.close()


def test_a_run_that_must_write_waits_for_a_held_registry_and_says_so_once(runner, tiny_runs, tmp_path):
    db = tmp_path / "r.duckdb"
    shutil.copy(tiny_runs["gpt2"][0], db)  # a registry that exists, so a reader can hold it
    holder = _holder(db)
    threading.Thread(target=_release_once_waited_for, args=(holder, db), daemon=True).start()
    result = invoke(runner, *TINY, "--max-steps", 2, "--db", db, "--out", tmp_path / "runs", "--quiet")
    holder.wait(timeout=60)
    assert result.exit_code == 0, result.stderr
    # the start must be recorded: it waited, and the progress view said for what, once
    assert result.stderr.count("is held by") == 1 and f"pid {holder.pid} (python" in result.stderr
    assert "waiting up to 600 s for it" in " ".join(result.stderr.split())


def test_train_registry_wait_s_bounds_that_wait(runner, tiny_runs, tmp_path):
    db = tmp_path / "r.duckdb"
    shutil.copy(tiny_runs["gpt2"][0], db)
    holder = _holder(db)
    try:
        result = invoke(runner, *TINY, "--max-steps", 2, "--set", "train.registry_wait_s=0.5", "--db", db,
                        "--out", tmp_path / "runs", "--quiet")
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert result.exit_code == 1
    assert re.match(rf"Error: Run gpt2-\S+ could not write to the registry {re.escape(str(db))}: pid {holder.pid} "
                    r"\(python", result.stderr), result.stderr
    assert result.stderr.endswith("stop that process and try again.\n")
