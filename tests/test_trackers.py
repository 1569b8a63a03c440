"""Trackers (``train.report_to``): TensorBoard event files and an MLflow run that hold what the registry holds,
read back with TensorBoard's own event reader and MLflow's client on its local store; a tracker that cannot
write warns once and the run finishes; ``dyntie export-metrics`` sends a run recorded without them."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from dyntie_cli.results.trackers import EXPERIMENT, tie_picture
from tests.conftest import invoke, rows

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install 'dyntie[test]')")
pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install 'dyntie[test]')")

RUN = ("train", "llama", "--preset", "llama-tiny", "--max-steps", "10", "--decide-every", "3", "--set",
       "train.eval_every=5", "--set", "train.log_every=5", "--set", "agent.keep_bias=0", "--quiet")


def _train(runner, tmp_path, *extra) -> tuple[Path, str, object]:
    db = tmp_path / "r.duckdb"
    result = invoke(runner, *RUN, "--db", db, "--out", tmp_path / "runs", *extra)
    assert result.exit_code == 0, result.stderr or result.output
    run_id = next(line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("run_id: "))
    return db, run_id, result


def _registry(db, run_id) -> dict[str, dict[int, float]]:
    """Every metric of the run as the trackers name it (split/name), and each decision's reward."""
    out: dict[str, dict[int, float]] = {}
    for step, split, name, value in rows(db, "SELECT step, split, name, value FROM metrics WHERE run_id = ?", run_id):
        out.setdefault(f"{split}/{name}", {})[step] = value
    for step, reward in rows(db, "SELECT step, reward FROM decisions WHERE run_id = ? AND reward IS NOT NULL",
                             run_id):
        out.setdefault("decisions/reward", {})[step] = reward
    for step, trainable in rows(db, "SELECT step, trainable_params FROM memory WHERE run_id = ?", run_id):
        out.setdefault("memory/trainable_params", {})[step] = trainable
    for step, independent in rows(db, "SELECT step, independent_layers FROM ties WHERE run_id = ?", run_id):
        out.setdefault("ties/independent_layers", {})[step] = independent
    return out


def _check_tensorboard(folder: Path, db, run_id) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / run_id), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    want = _registry(db, run_id)
    assert set(want) <= set(events.Tags()["scalars"])
    for tag, values in want.items():
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert got.keys() == values.keys(), tag
        for step, value in values.items():  # event files hold float32
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-30), (tag, step)
    (picture,) = events.Images("ties/state")[-1:]
    states = [s for (s,) in rows(db, "SELECT state FROM ties WHERE run_id = ? ORDER BY decision", run_id)]
    assert (picture.height, picture.width) == tie_picture(states).shape[:2]
    assert events.PluginTagToContent("hparams")  # the settings, in the HPARAMS tab


def _mlflow_run(store: Path, run_id: str):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (found,) = client.search_runs([experiment], f"tags.`dyntie.run_id` = '{run_id}'")
    return client, found


def _check_mlflow(store: Path, db, run_id) -> None:
    client, run = _mlflow_run(store, run_id)
    for key, values in _registry(db, run_id).items():
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == values, key  # the same numbers, exactly
    config = json.loads(rows(db, "SELECT config FROM runs WHERE run_id = ?", run_id)[0][0])
    assert run.data.params["train.lr"] == str(config["train"]["lr"])
    assert run.data.params["model.num_hidden_layers"] == "4"
    assert run.info.status == "FINISHED" and run.data.tags["dyntie.variant"] == "dynamic"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["ties.png"]


def test_a_run_reports_to_tensorboard_and_mlflow_what_the_registry_holds(runner, tmp_path):
    db, run_id, result = _train(runner, tmp_path, "--set", "train.report_to=tensorboard,mlflow")
    assert "tracker" not in result.stderr
    assert json.loads(rows(db, "SELECT config FROM runs")[0][0])["train"]["report_to"] == "tensorboard,mlflow"
    _check_tensorboard(tmp_path / "runs" / "tensorboard", db, run_id)
    _check_mlflow(tmp_path / "runs" / "mlruns", db, run_id)


def test_a_tracker_that_cannot_write_warns_once_and_the_run_finishes(runner, tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    db, run_id, result = _train(runner, tmp_path, "--set", "train.report_to=tensorboard,mlflow", "--set",
                                f"train.tracker_dir={blocked}")
    assert rows(db, "SELECT status FROM runs") == [("finished",)]
    for name in ("tensorboard", "mlflow"):
        assert result.stderr.count(f"the {name} tracker stopped") == 1, result.stderr
    assert "Traceback" not in result.stderr
    # a missing library is the same: one warning that names the extra to install
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    _, _, result = _train(runner, tmp_path, "--set", "train.report_to=mlflow")
    assert result.stderr.count("pip install 'dyntie[mlflow]'") == 1, result.stderr


def test_export_metrics_sends_a_run_recorded_without_trackers(runner, tmp_path):
    db, run_id, _ = _train(runner, tmp_path)
    assert not (tmp_path / "runs" / "tensorboard").exists() and not (tmp_path / "runs" / "mlruns").exists()
    out = tmp_path / "tracked"
    for _ in range(2):  # sending again replaces what was sent
        sent = invoke(runner, "export-metrics", run_id[:-2], "--to", "tensorboard,mlflow", "--out", out, "--db", db)
        assert sent.exit_code == 0, sent.stderr
    assert f"sent: {run_id} (" in sent.stdout
    _check_tensorboard(out / "tensorboard", db, run_id)
    _check_mlflow(out / "mlruns", db, run_id)
    refused = invoke(runner, "export-metrics", run_id, "--to", "wandb", "--db", db)
    assert refused.exit_code == 2 and "must be none, tensorboard, mlflow" in refused.stderr


def test_report_to_names_known_trackers_only(runner, tmp_path):
    r = invoke(runner, *RUN, "--set", "train.report_to=wandb", "--db", tmp_path / "r.duckdb")
    assert r.exit_code == 2 and "must be none, tensorboard, mlflow or several joined by commas" in r.stderr


def test_the_tie_picture_has_a_row_per_block_and_a_column_per_decision():
    states = [[0, 0, 0], [0, 1, 1], [0, 1, 2]]
    picture = tie_picture(states)
    cell_h, cell_w = picture.shape[0] // 3, picture.shape[1] // 3
    cell = {(b, d): picture[b * cell_h, d * cell_w].astype(int) for b in range(3) for d in range(3)}
    assert picture.dtype == np.uint8 and picture.shape[2] == 3
    assert not np.array_equal(cell[1, 1], cell[0, 0])  # block 1 trains from decision 1: its own colour
    assert (cell[2, 1] >= cell[1, 1]).all() and not np.array_equal(cell[2, 1], cell[1, 1])  # tied to 1: paler
    assert (cell[1, 0] >= cell[0, 0]).all()  # tied to block 0 at decision 0: block 0's colour, paler


def test_a_resumed_run_goes_on_in_the_same_tensorboard_folder_and_mlflow_run(tmp_path):
    from dyntie_cli.core.loop import Job
    from dyntie_cli.errors import DyntieError
    from dyntie_cli.runner.jobs import Launch, resume_recorded, run_job
    from dyntie_cli.runner.settings_source import SettingsSource, new_settings

    flags = (("train.max_steps", 12), ("ties.decide_every", 3), ("train.eval_every", 4), ("train.log_every", 2),
             ("train.report_to", "tensorboard,mlflow"))
    backbone, settings = new_settings("llama", SettingsSource("llama-tiny", flags=flags))
    db, out = tmp_path / "r.duckdb", tmp_path / "runs"

    def stop_at_six(event):
        if event["type"] == "log" and event["step"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop stops at this step boundary, checkpointed

    with pytest.raises(DyntieError, match="resume it with"):
        run_job(backbone, Job(settings), Launch(db, out, quiet=True), print_summary=False, listen=stop_at_six)
    (run_id,) = rows(db, "SELECT run_id FROM runs")[0]
    _, stopped = _mlflow_run(out / "mlruns", run_id)
    assert stopped.info.status == "KILLED"
    resume_recorded(db, run_id, quiet=True, print_summary=False)
    _check_tensorboard(out / "tensorboard", db, run_id)
    _check_mlflow(out / "mlruns", db, run_id)
