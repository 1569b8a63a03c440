"""Bad input gets one sentence and a non-zero exit, checked before work starts where it can be: out-of-range numbers,
empty names, damaged files."""

from __future__ import annotations

import pytest

from tests.conftest import invoke

TINY = ("train", "gpt2", "--preset", "gpt2-tiny")


# --- folders, registries and names ---------------------------------------------------------------------------


@pytest.mark.parametrize("args", [("export", "", "--out", "x")])
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


