"""Model selection, as transformers' ``load_best_model_at_end``: every run keeps the model of its best validation
figure in ``best/``, scores the test split once on it, records ``validation/best_<metric>`` and ``best_step``;
the test split never chooses anything; early stopping; ``--best`` exports; a killed run selects exactly what an
uninterrupted one does.

The runs train gpt2-tiny on a small text folder at a constant, high learning rate, so validation perplexity is
best early (step 12 of 32) and the best model differs from the last one, tie state included.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from dyntie_cli.core.loop import Job, Trainer
from dyntie_cli.errors import DyntieError
from dyntie_cli.export import load_run_model
from dyntie_cli.plugins import get_backbone
from dyntie_cli.results.queries import run_query
from dyntie_cli.results.writer import RunWriter
from dyntie_cli.runner.jobs import resume_recorded
from dyntie_cli.settings import parse_sets, resolve
from tests.conftest import MOVING_AGENT, invoke, rows
from tests.test_reproducible import logged

CHARS = 12_000
STEPS = 32
BEST = 12
OVERFIT = ("--seed", 1, "--max-steps", STEPS, "--decide-every", 4, "--set", "train.eval_every=4", "--set", "train.lr=0.01",
           "--set", "train.min_lr_ratio=1.0", "--set", "data.max_train_tokens=1000", *MOVING_AGENT)


def _folder(where: Path, test_text: str, texts: dict[str, str]) -> Path:
    where.mkdir(parents=True)
    (where / "train.txt").write_text(texts["train"])
    (where / "valid.txt").write_text(texts["validation"])
    (where / "test.txt").write_text(test_text)
    return where


def _train(runner, db: Path, out: Path, dataset: Path, *extra) -> str:
    r = invoke(runner, "train", "gpt2", "--preset", "gpt2-tiny", "--dataset", f"text:{dataset}", "--db", db,
               "--out", out, "--quiet", *OVERFIT, *extra)
    assert r.exit_code == 0, r.stderr
    return rows(db, "SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1")[0][0]


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """Runs of the same seed and settings: on the real test split (selecting the best model, and not), and on a
    test split replaced by the training text, whose perplexity only falls as the model memorises it."""
    from typer.testing import CliRunner

    from backbones.text_corpora import load_corpus

    tmp = tmp_path_factory.mktemp("best")
    texts = {split: text[:CHARS] for split, text in load_corpus("wikitext-2").splits.items()}
    real = _folder(tmp / "real", texts["test"], texts)
    swapped = _folder(tmp / "swapped", texts["train"], texts)
    runner = CliRunner()
    db, out = tmp / "r.duckdb", tmp / "runs"
    return {
        "db": db, "out": out, "real": real,
        "best": _train(runner, db, out, real),
        "swapped": _train(runner, db, out, swapped),
        "last": _train(runner, db, out, real, "--set", "train.select_best=false"),
    }


def _metric(db: Path, run_id: str, split: str, name: str):
    found = rows(db, "SELECT step, value FROM metrics WHERE run_id = ? AND split = ? AND name = ?", run_id, split,
                 name)
    assert len(found) == 1, (split, name, found)
    return found[0]


def _test_ppl_of(db: Path, run_id: str, *, best: bool) -> float:
    """The test perplexity of the run's best (or last) model, scored here from its folder."""
    rm = load_run_model(db, run_id, best=best)
    items = rm.settings.train.test_items or None
    return rm.backbone.evaluate(rm.model, rm.data.eval_batches("test", items))["ppl"]


def test_the_test_split_never_chooses_the_model(overfit):
    db, out = overfit["db"], overfit["out"]
    best, swapped = overfit["best"], overfit["swapped"]
    step, value = _metric(db, best, "validation", "best_step")
    assert (step, value) == (STEPS, BEST), "the best validation is early, so the best model is not the last one"
    assert _metric(db, best, "validation", "best_ppl")[1] == min(
        v for (v,) in rows(db, "SELECT value FROM metrics WHERE run_id = ? AND split = 'validation' AND name = "
                               "'ppl'", best))
    # the test split changed; everything it could have chosen is the same
    assert _metric(db, swapped, "validation", "best_step") == (STEPS, BEST)
    assert _metric(db, swapped, "test", "ppl")[1] != _metric(db, best, "test", "ppl")[1]
    for name in ("model.safetensors", "ties.json", "best.json"):
        assert (out / best / "best" / name).read_bytes() == (out / swapped / "best" / name).read_bytes(), name
    last_state = json.loads((out / best / "checkpoint" / "ties.json").read_text())["state"]
    assert json.loads((out / best / "best" / "ties.json").read_text())["state"] != last_state
    # the test rows are the best model's (its tie state and weights restored), at the last step
    assert _metric(db, best, "test", "ppl") == (STEPS, pytest.approx(_test_ppl_of(db, best, best=True), rel=1e-6))


def test_select_best_false_scores_the_last_model_and_records_the_best_all_the_same(overfit):
    db, out, last = overfit["db"], overfit["out"], overfit["last"]
    assert _metric(db, last, "validation", "best_step") == (STEPS, BEST)
    assert _metric(db, last, "test", "ppl") == (STEPS, pytest.approx(_test_ppl_of(db, last, best=False), rel=1e-6))
    assert _metric(db, last, "test", "ppl")[1] != _metric(db, overfit["best"], "test", "ppl")[1]
    assert not (out / last / "best").exists()
    table = {r.run_id: r for r in run_query("ppl", db).itertuples()}
    assert table[overfit["best"]].best_validation_step == BEST
    assert table[overfit["best"]].test_at_best == _metric(db, overfit["best"], "test", "ppl")[1]
    assert table[last].best_validation_step == BEST and table[last].test_at_best != table[last].test_at_best  # NaN


def test_export_best_writes_the_best_model_and_refuses_a_run_without_one(overfit, runner, tmp_path):
    db = overfit["db"]
    r = invoke(runner, "export", overfit["best"], "--best", "--out", tmp_path / "best", "--db", db)
    assert r.exit_code == 0, r.stderr
    assert f"the model of step {BEST}, its best validation" in r.stdout
    config = json.loads((tmp_path / "best" / "config.json").read_text())
    assert (config["dyntie_model"], config["dyntie_step"]) == ("best", BEST)
    assert config["dyntie_tie_map"] == json.loads(
        (overfit["out"] / overfit["best"] / "best" / "ties.json").read_text())["state"]
    r = invoke(runner, "export", overfit["last"], "--best", "--out", tmp_path / "none", "--db", db)
    assert r.exit_code == 1 and "has no best model" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_patience_ends_the_run_after_validations_without_a_better_figure(overfit, runner, tmp_path):
    db = tmp_path / "p.duckdb"
    run = _train(runner, db, tmp_path / "runs", overfit["real"], "--set", "train.patience=2")
    # best at step 12, no better at 16 and 20: the run ends at 20, tested on the model of step 12
    assert rows(db, "SELECT max(step) FROM metrics WHERE run_id = ?", run) == [(20,)]
    assert _metric(db, run, "validation", "best_step") == (20, BEST)
    assert _metric(db, run, "test", "ppl")[0] == 20
    assert rows(db, "SELECT count(*) FROM metrics WHERE run_id = ? AND split = 'validation' AND name = 'ppl' "
                    "AND step = 20", run) == [(1,)]  # the stopping validation is the final one, logged once
    assert rows(db, "SELECT status FROM runs WHERE run_id = ?", run) == [("finished",)]


def test_a_run_killed_after_its_best_resumes_to_the_same_selection(overfit, tmp_path):
    db, out = tmp_path / "k.duckdb", tmp_path / "runs"
    backbone = get_backbone("gpt2")
    pairs = [("dataset", f"text:{overfit['real']}"), ("seed", 1), ("train.max_steps", STEPS), ("ties.decide_every", 4)]
    flags = [str(a) for a in OVERFIT]
    pairs += parse_sets(flags[i + 1] for i, a in enumerate(flags) if a == "--set")
    settings = resolve(type(backbone), backbone.presets["gpt2-tiny"], sources=[pairs])
    writer = RunWriter(db, backbone="gpt2")
    trainer = Trainer(backbone, Job(settings), writer, out_dir=out)

    def stop_after_the_best(event):  # validations at 4, 8, 12 (the best); stopped at step 15
        if event["type"] == "log" and event["step"] == 15:
            trainer.stop_signal = signal.SIGTERM

    trainer.events = stop_after_the_best
    with pytest.raises(DyntieError, match="resume it with"):
        trainer.run()
    assert json.loads((out / writer.run_id / "best" / "best.json").read_text())["step"] == BEST
    resume_recorded(db, writer.run_id, quiet=True, print_summary=False)
    want_db, want = overfit["db"], overfit["best"]
    assert logged(db, writer.run_id) == logged(want_db, want)
    for folder in ("best", "checkpoint"):
        for name in ("model.safetensors", "ties.json"):
            assert (out / writer.run_id / folder / name).read_bytes() == \
                (overfit["out"] / want / folder / name).read_bytes(), (folder, name)
