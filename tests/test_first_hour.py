"""A new user's first hour: the four headline commands as written, offline, and what they print.

``dyntie train gpt2 --dataset wikitext-103``, ``dyntie finetune glue --task rte``, ``dyntie report --table
memory`` and ``dyntie ablate --variant final-arch`` run through the real CLI with the registry given by
``DYNTIE_DB`` (as a user who set it once would) and, where a default run would take minutes, a tiny preset.
"""

from __future__ import annotations

import io
import itertools
import lzma
import re
import threading
from importlib import resources
from pathlib import Path

import pytest
from rich.console import Console

from dyntie_cli.app import app, reflow
from dyntie_cli.backbones.glue_splits import load_glue_splits, read_glue_tsv
from dyntie_cli.backbones.glue_tasks import get_task
from dyntie_cli.report.tables import render
from dyntie_cli.results.queries import QUERIES, run_query
from dyntie_cli.runner.view import ProgressView
from tests.conftest import SHARED, invoke
from tests.conftest import rows as _rows
from tests.test_registry import left_out

ROOT = Path(__file__).resolve().parents[1]
TINY_GPT2 = ("--preset", "gpt2-tiny", "--max-steps", "12", "--decide-every", "4")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _run_id(stdout: str) -> str:
    return next(line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith("run_id: "))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A registry a user made in their first hour: one `dyntie train gpt2` and the ablation after it."""
    from typer.testing import CliRunner

    tmp = tmp_path_factory.mktemp("first-hour")
    env = {"DYNTIE_DB": str(tmp / "dyntie.duckdb"), "DYNTIE_OUT": str(tmp / "runs")}
    runner = CliRunner(env=env)
    train = invoke(runner, "train", "gpt2", *TINY_GPT2)
    assert train.exit_code == 0, train.stderr
    ablate = invoke(runner, "ablate", "--variant", "final-arch")
    assert ablate.exit_code == 0, ablate.stderr
    return tmp / "dyntie.duckdb", train, ablate


# --- the four headline commands -----------------------------------------------------------------------------


def test_train_on_wikitext103_offline_names_the_fix_in_one_sentence(runner, tmp_path):
    r = invoke(runner, "train", "gpt2", "--dataset", "wikitext-103", "--db", tmp_path / "r.duckdb",
               "--out", tmp_path / "runs")
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: WikiText-103 is not available offline: pass --data-dir DIR")
    assert [line for line in lines if line.startswith("Error")] == [lines[-1]]
    assert lines[-1].count(". ") == 0 and lines[-1].endswith(".")  # one sentence


def test_finetune_glue_rte_runs_offline_from_the_shipped_copy(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNTIE_DB", str(tmp_path / "dyntie.duckdb"))
    monkeypatch.chdir(tmp_path)  # checkpoints under ./runs, as a user's would be
    r = invoke(runner, "finetune", "glue", "--task", "rte", "--preset", "bert-tiny", "--max-steps", "4")
    assert r.exit_code == 0, r.stderr
    assert "embedded copy of GLUE RTE: train.tsv 2,490 rows, dev.tsv 277 rows" in r.stderr
    assert "final validation (no labelled test split): loss=" in r.stdout
    # that BERT starts from random weights, and how to start from pretrained ones, is said at the start and in the
    # summary; beside its accuracy, what always answering the most frequent label of the same dev rows scores
    for out in (r.stderr, r.stdout):
        assert "BERT starts from random weights (no --init)" in out and "pass --init DIR, a local BERT folder" in out
    dev = load_glue_splits(get_task("rte"), None)[0]["dev"].labels[:256]  # bert-tiny scores 256 dev rows
    entailment = dev.count(0) / len(dev)
    assert entailment > 0.5
    lines = r.stdout.splitlines()
    final = next(i for i, line in enumerate(lines) if line.startswith("final validation"))
    assert lines[final + 1] == (f"majority class: accuracy={entailment:.4f} (always 'entailment', the most "
                                "frequent label of the dev split)")
    run_id = _run_id(r.stdout)
    assert _rows(tmp_path / "dyntie.duckdb", "SELECT dataset, status FROM runs WHERE run_id = ?", run_id) == [
        ("rte", "finished")]
    assert (tmp_path / "runs" / run_id / "checkpoint").is_dir()


def test_report_table_memory_fits_an_80_column_terminal(registry, runner, monkeypatch):
    db, _, _ = registry
    monkeypatch.setenv("DYNTIE_DB", str(db))
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # stdout is a terminal of 80 columns
    monkeypatch.setenv("COLUMNS", "80")
    r = invoke(runner, "report", "--table", "memory")
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    hidden = left_out(r.stdout)
    columns = set(run_query("memory", db).columns)
    assert hidden < columns and "device" in hidden
    # the columns a person looks for first are the ones kept: the whole process's peak above all
    assert not hidden & {"run_id", "variant", "process_peak_bytes", "avg_current_bytes", "training_state_bytes_peak"}
    assert "process_" in r.stdout.split("──", 1)[0]  # in the header, however its name wraps
    wide = invoke(runner, "report", "--table", "memory", "--wide")
    assert wide.exit_code == 0 and max(len(line) for line in wide.stdout.splitlines()) > 80
    assert all(column in wide.stdout for column in run_query("memory", db).columns)


def test_ablate_final_arch_without_a_run_uses_the_newest_dynamic_run(registry):
    db, train, ablate = registry
    source = _run_id(train.stdout)
    notes = [line for line in ablate.stderr.splitlines() if line.startswith("ablate: ")]
    assert notes == [(f"ablate: from {source}, the newest finished dynamic gpt2 run in {db} (--from-run RUN picks "
                      "another)")]
    run_id = _run_id(ablate.stdout)
    assert _rows(db, "SELECT variant, parent_run_id, command FROM runs WHERE run_id = ?", run_id) == [
        ("final-arch", source, "ablate")]
    # what it is, in its header and in its summary
    assert f"run {run_id} - ablation final-arch of {source} - 4 blocks - data:" in ablate.stderr.replace("\n", " ")
    assert f"run: ablation final-arch of {source}" in ablate.stdout
    assert f"dyntie report --compare {source} {run_id}" in ablate.stdout


def test_ablate_without_any_run_names_train_and_the_runs_table(runner, tmp_path):
    db = tmp_path / "empty.duckdb"
    r = invoke(runner, "ablate", "--variant", "final-arch", "--db", db)
    assert r.exit_code == 1
    (line,) = r.stderr.strip().splitlines()
    assert "`dyntie train gpt2`" in line and "`dyntie report --table runs`" in line and "--from-run" in line
    assert not db.exists()  # reading never creates a registry
    r = invoke(runner, "ablate", "--variant", "replay", "--backbone", "glue", "--db", db)
    assert r.exit_code == 1 and "`dyntie finetune glue`" in r.stderr


def test_ablate_picks_the_newest_finished_dynamic_run_of_the_backbone(registry, runner, tmp_path):
    from dyntie_cli.results.lineage import newest_finished_run

    db, train, ablate = registry
    assert newest_finished_run(db) == _run_id(train.stdout)  # not the newer final-arch run
    assert newest_finished_run(db, backbone="vit") is None
    assert newest_finished_run(tmp_path / "missing.duckdb") is None


# --- "the newest run" is the user's run ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def user_registry(tmp_path_factory):
    """A first hour as the issue found it: the main job, an RTE run after it, then an ablation stopped after a few
    steps (not at a logging step)."""
    from typer.testing import CliRunner

    from tests.conftest import FIXTURES
    from tests.test_resume import stop_at

    tmp = tmp_path_factory.mktemp("user")
    env = {"DYNTIE_DB": str(tmp / "dyntie.duckdb"), "DYNTIE_OUT": str(tmp / "runs")}
    runner = CliRunner(env=env)
    main = invoke(runner, "train", "gpt2", *TINY_GPT2)
    rte = invoke(runner, "finetune", "glue", "--task", "rte", "--preset", "bert-tiny", "--data-dir",
                 FIXTURES / "glue", "--max-steps", "8")
    with pytest.MonkeyPatch.context() as patch:
        stop_at(patch, 7)
        stopped = invoke(runner, "ablate", "--variant", "replay")
    assert (main.exit_code, rte.exit_code, stopped.exit_code) == (0, 0, 143), stopped.output
    db = tmp / "dyntie.duckdb"
    (stopped_id,) = _rows(db, "SELECT run_id FROM runs WHERE status = 'killed'")[0]
    return db, runner, _run_id(main.stdout), _run_id(rte.stdout), stopped_id


def test_ablate_without_a_run_ablates_the_main_job_not_the_newer_rte_run(user_registry):
    db, runner, main, rte, _ = user_registry
    r = invoke(runner, "ablate", "--variant", "final-arch", "--max-steps", "4")
    assert r.exit_code == 0, r.output
    assert f"ablate: from {main}, the newest finished dynamic gpt2 run in {db}" in r.stderr
    assert _rows(db, "SELECT parent_run_id FROM runs WHERE run_id = ?", _run_id(r.stdout)) == [(main,)]
    # told the backbone, it takes that backbone's newest
    r = invoke(runner, "ablate", "--variant", "final-arch", "--backbone", "glue", "--max-steps", "4")
    assert r.exit_code == 0, r.output
    assert _rows(db, "SELECT parent_run_id FROM runs WHERE run_id = ?", _run_id(r.stdout)) == [(rte,)]


def test_the_ties_plot_draws_the_main_job(user_registry, tmp_path):
    _, runner, main, _, _ = user_registry
    r = invoke(runner, "report", "--plot", "ties", "--out", tmp_path / "ties.png")
    assert r.exit_code == 0, r.output
    assert r.stderr.strip() == f"ties plot of {main}, the newest finished dynamic run (--run R draws another)"
    assert (tmp_path / "ties.png").stat().st_size > 0


def test_the_paper_table_shows_the_main_job_and_its_ablations_in_80_columns(user_registry, monkeypatch):
    db, runner, main, rte, stopped = user_registry
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", "80")
    r = invoke(runner, "report", "--table", "paper")
    assert r.exit_code == 0, r.output
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    chosen = run_query("paper", db).attrs["chosen"]
    assert main not in left_out(r.stdout) and len(left_out(r.stdout)) == len(chosen) - 2  # the main job's column
    assert chosen[0] == main and stopped in chosen and rte not in chosen
    assert r.stderr.startswith(f"paper: {main}, the newest finished dynamic run and the")
    table = run_query("paper", db).set_index("quantity")
    # a stopped run's validation is not its result, and its status says why
    assert table.at["status", stopped] == "killed" and table.at["result", stopped] is None
    assert table.at["metric", stopped] == "ppl (no result: killed)"
    assert table.at["status", main] == "finished" and table.at["result", main] is not None


def test_every_table_that_lists_runs_marks_the_stopped_one(user_registry):
    db, _, _, _, stopped = user_registry
    for name in ("runs", "ppl", "params", "layers", "memory", "agent"):
        table = run_query(name, db)
        assert dict(zip(table.run_id, table.status, strict=True))[stopped] == "killed", name
        fitted = render(table, "table", title=name, width=80)
        assert max(len(line) for line in fitted.splitlines()) <= 80, name
        lines = fitted.splitlines()
        row = next(line for line in lines if stopped in line)
        assert "killed" in row or (f"{stopped} *" in row and any(line.startswith("* did not finish") for line in lines)), \
            (name, fitted)


def test_the_runs_table_shows_the_step_a_stopped_run_reached_and_each_finished_runs_result(user_registry,
                                                                                         monkeypatch):
    db, runner, main, rte, stopped = user_registry
    table = run_query("runs", db).set_index("run_id")
    assert table.at[stopped, "checkpoint_step"] == 7  # stopped at step 7; its last logged row is step 5
    assert table.at[stopped, "last_logged_step"] == 5
    assert pd_isna(table.at[stopped, "result"])
    test_ppl = _rows(db, "SELECT value FROM metrics WHERE run_id = ? AND split = 'test' AND name = 'ppl'", main)
    assert table.at[main, "result"] == test_ppl[0][0] and table.at[main, "checkpoint_step"] == 12
    assert table.at[rte, "metric"] == "accuracy"
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", "80")
    r = invoke(runner, "report", "--table", "runs")
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    assert not left_out(r.stdout) & {"status", "variant", "checkpoint_step", "result"}


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


# --- the end of a run -----------------------------------------------------------------------------------------


def test_the_summary_names_the_registry_the_time_the_full_model_and_what_to_run_next(registry):
    db, train, _ = registry
    out = train.stdout
    run_id = _run_id(out)
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line and not line.startswith(" "))
    assert lines["registry"] == str(db)
    assert re.fullmatch(r"(\d+m )?\d+s \(setup, training, evaluation and the checkpoint\)", lines["wall time"])
    full = int(_rows(db, "SELECT value FROM metrics WHERE run_id = ? AND name = 'conventional_params'",
                     run_id)[0][0])
    assert re.fullmatch(rf"mean [\d,]+, end [\d,]+ of {full:,} in the full model \(every block its own weights\)",
                        lines["trainable params"])
    commands = [line.strip() for line in out.splitlines() if line.startswith("  dyntie ")]
    assert f"dyntie report --run {run_id} --table paper" in commands  # DYNTIE_DB: no --db needed
    assert f"dyntie export {run_id} --out DIR" in commands
    for key in ("run_id", "final test", "checkpoint"):  # the lines scripts grep stay
        assert key in lines


def test_the_end_of_a_run_is_announced(registry):
    _, train, _ = registry
    phases = [line for line in train.stderr.splitlines() if line.startswith("step 12: ")]
    # the last model's checkpoint comes before the test split, which may score the best validation's model
    announced = [line for line in phases if line.endswith("...")]
    assert announced == ["step 12: final validation...", "step 12: writing the checkpoint...",
                         "step 12: computing the final score (on the test split)..."]


def _progress_lines(width: int, total: int, peak_bytes: int) -> list[str]:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=True, color_system=None)
    view = ProgressView(False, console=console)
    view({"type": "start", "run_id": "gpt2-20260101-000000-abcd", "total": total, "step": 0, "blocks": 48,
          "source": "wikitext-2", "command": "train", "variant": "dynamic", "parent_run_id": None})
    view({"type": "log", "step": total // 3, "loss": 9.4, "ppl": 12345.6, "independent": 47, "blocks": 48,
          "peak_bytes": peak_bytes, "trainable": 1})
    view.close()
    text = ANSI.sub("", buffer.getvalue()).replace("\r", "\n")
    return [line for line in text.splitlines() if line.startswith("step ")]


@pytest.mark.parametrize("width", [80, 100, 60])
def test_the_progress_line_keeps_elapsed_and_eta_visible(width):
    last = _progress_lines(width, 10000, 3 * 2**30)[-1]
    assert len(last) <= width
    assert re.search(r"\d+:\d\d:\d\d ETA (\d+:\d\d:\d\d|-:--:--)$", last), last
    assert "…" not in last and last.startswith("step 3333/10000")
    if width >= 80:
        assert "ppl 12345.6 indep 47/48" in last


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _piped_view(clock: FakeClock, quiet: bool = False) -> tuple[ProgressView, io.StringIO]:
    buffer = io.StringIO()
    console = Console(file=buffer, width=80, force_terminal=False, color_system=None)
    return ProgressView(quiet, console=console, clock=clock, watch=False), buffer


def test_a_piped_run_prints_progress_at_most_every_30s_and_never_stays_silent_a_minute():
    clock = FakeClock()
    view, buffer = _piped_view(clock)
    clock.now += 61  # a slow setup: said as such
    view.tick()
    assert buffer.getvalue().splitlines()[-1] == "setting up (data, model)... (1m 01s elapsed)"
    view({"type": "start", "run_id": "gpt2-20260101-000000-abcd", "total": 100, "step": 0, "blocks": 12,
          "source": "wikitext-2", "command": "train", "variant": "dynamic", "parent_run_id": None})
    for step in range(1, 41):  # a step every 2 s, a log row every 10 steps
        clock.now += 2
        if step % 10 == 0:
            view({"type": "log", "step": step, "loss": 5.5, "ppl": 244.7, "independent": 3, "blocks": 12,
                  "peak_bytes": 300 * 2**20, "trainable": 1})
        view({"type": "step", "step": step, "loss": 5.5})
    progress = [line for line in buffer.getvalue().splitlines() if line.startswith("step ")]
    # 80 s of training after the header: a line at 30 s and at 60 s, none between
    assert progress == [
        "step 15/100, loss 5.5 ppl 244.7 indep 3/12 mem 300 MiB, 1m 31s elapsed, about 2m 50s left",
        "step 30/100, loss 5.5 ppl 244.7 indep 3/12 mem 300 MiB, 2m 01s elapsed, about 2m 20s left"]
    lines = len(buffer.getvalue().splitlines())
    clock.now += 39  # step 41 takes a while: 59 s since the last line, nothing yet ...
    view.tick()
    assert len(buffer.getvalue().splitlines()) == lines
    clock.now += 1  # ... a minute: the watcher says where the run is
    view.tick()
    assert buffer.getvalue().splitlines()[-1].startswith("step 40/100, loss 5.5")
    view({"type": "phase", "phase": "test", "final": True, "step": 100, "split": "test"})
    clock.now += 60
    view.tick()  # a long final evaluation: said as such
    assert buffer.getvalue().splitlines()[-1] == ("step 100: computing the final score (on the test split)... "
                                                  "(4m 01s elapsed)")
    quiet, buffer = _piped_view(clock, quiet=True)
    clock.now += 600
    quiet.tick()
    assert buffer.getvalue() == ""


def test_the_watcher_thread_ends_with_the_view():
    view, _ = _piped_view(FakeClock())
    assert any(t.name == "dyntie-progress" for t in threading.enumerate()) is False  # watch=False: no thread
    threaded = ProgressView(False, console=Console(file=io.StringIO(), force_terminal=False), silence_s=0.04)
    watcher = next(t for t in threading.enumerate() if t.name == "dyntie-progress")
    threaded.close()
    watcher.join(timeout=5)
    assert not watcher.is_alive()


# --- help text ------------------------------------------------------------------------------------------------


def _commands():
    import typer.main

    group = typer.main.get_command(app)
    yield (), group
    for name, command in group.commands.items():
        yield (name,), command
        for sub, inner in getattr(command, "commands", {}).items():
            yield (name, sub), inner


@pytest.mark.parametrize("path", [p for p, _ in _commands()], ids=lambda p: " ".join(p) or "dyntie")
def test_help_fits_80_columns_without_broken_sentences(path, runner, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    command = dict(_commands())[path]
    assert command.help == reflow(command.help)  # no line break inside a paragraph
    r = invoke(runner, *path, "--help")
    assert r.exit_code == 0
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    words = (command.epilog or "").split()
    for flag, value in itertools.pairwise(words):
        if flag == "--data-dir" and value != "DIR":
            assert (ROOT / value).is_dir(), value  # an example path exists in a clone


# --- the shipped RTE --------------------------------------------------------------------------------------------


def test_shipped_rte_is_glues_train_and_dev(tmp_path):
    task = get_task("rte")
    splits, origin = load_glue_splits(task, None)
    assert (len(splits["train"]), len(splits["dev"])) == (2490, 277)
    assert origin.startswith("embedded copy of GLUE RTE")
    folder = resources.files("dyntie_cli.backbones") / "data" / "glue" / "RTE"
    assert "Licence" in (folder / "ATTRIBUTION.txt").read_text()
    if not (SHARED / "glue" / "RTE").is_dir():
        pytest.skip("the offline data bundle is not present")
    for name, role in (("train.tsv", "train"), ("dev.tsv", "dev")):
        data = lzma.decompress((folder / f"{name}.xz").read_bytes())
        assert data == (SHARED / "glue" / "RTE" / name).read_bytes()
        local, _ = read_glue_tsv(SHARED / "glue" / "RTE" / name, task)
        assert local.texts == splits[role].texts and local.labels == splits[role].labels


def test_tables_fit_the_width_they_are_given_and_pipes_keep_every_column(registry):
    db, _, _ = registry
    for name in ("runs", "memory", "params", "layers", "agent", "ppl", "paper"):
        table = run_query(name, db)
        piped = render(table, "table", title=name)
        for column in table.columns:
            assert str(column) in piped  # every column, names unbroken
        fitted = render(table, "table", title=name, width=80)
        assert max(len(line) for line in fitted.splitlines()) <= 80, name
        assert not left_out(fitted) & set(QUERIES[name].headline), name


def test_every_shipped_data_file_is_package_data():
    """A wheel (a non-editable install) holds what `pyproject.toml` declares as package data: every file under
    backbones/data must match one of its patterns, or an installed dyntie would lack it."""
    import fnmatch
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "dyntie_cli.backbones.data"]
    data = ROOT / "backbones" / "data"
    files = [p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert "glue/RTE/train.tsv.xz" in files and "glue/RTE/ATTRIBUTION.txt" in files
    # setuptools' globs do not cross "/": a pattern's depth must be the file's
    missing = [f for f in files if not any(fnmatch.fnmatch(f, p) and f.count("/") == p.count("/") for p in patterns)]
    assert missing == []
