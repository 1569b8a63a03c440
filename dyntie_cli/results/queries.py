"""Named queries over the registry; each returns a pandas DataFrame. All of dyntie's SQL that reads results
lives here (and in ``bench.py`` and ``study.py``, the bench and study tables): reports, plots and commands call
queries by name.

Every query takes the registry path and an optional list of run ids (full ids or unique prefixes; ``None``
means every run, most recent first). Per-run tables have one row per run in the order asked for, so
``--run A --run B`` lines up with what the user typed. An unknown id raises ``DyntieError``. Reading never
writes: a run whose process is gone is shown as ``killed`` (the next run that writes marks it so).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from dyntie_cli.core.checkpoint_info import load_run_file
from dyntie_cli.errors import UsageError
from dyntie_cli.lazy_import import pandas as pd
from dyntie_cli.results.db import IN_RUNS, RUN_ORDER, read_registry, resolve_run_ids
from dyntie_cli.results.lineage import newest_finished
from dyntie_cli.results.liveness import stale_reason

Builder = Callable[[duckdb.DuckDBPyConnection, list[str]], "pd.DataFrame"]



def _query(db: str | os.PathLike[str], run_ids: Sequence[str] | None, query: NamedQuery) -> pd.DataFrame:
    """``query`` over ``run_ids``; None: the query's own choice of runs, where it has one (``attrs["chosen"]``
    lists them), else every run."""
    path = Path(db)
    with read_registry(path) as con:
        chosen = query.default(con) if run_ids is None and query.default is not None else None
        table = query.build(con, chosen if chosen is not None else resolve_run_ids(con, run_ids, path))
    if chosen is not None:
        table.attrs["chosen"] = chosen
    return table


def _fetch(con: duckdb.DuckDBPyConnection, sql: str, ids: list[str]) -> pd.DataFrame:
    return con.execute(sql, {"ids": ids}).df()


def _per_run(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    """The spine every per-run table joins onto: one row per requested run, in order, with its status (a run
    stopped or killed part-way shows as such beside its figures, which are then not its result)."""
    table = _fetch(con, f"SELECT run_id, status, variant, pid, host FROM runs WHERE {IN_RUNS} ORDER BY {RUN_ORDER}",
                   ids)
    _mark_stale(table)
    return table.drop(columns=["pid", "host"])


def _mark_stale(table: pd.DataFrame) -> None:
    """A run recorded as running whose process is gone reads as killed (its ``error`` says why, where the table
    has one): reading never writes, so the registry still says running until the next run that writes."""
    for i in table.index:
        reason = stale_reason(table.at[i, "status"], table.at[i, "pid"], table.at[i, "host"])
        if reason:
            table.at[i, "status"] = "killed"
            if "error" in table and not isinstance(table.at[i, "error"], str):
                table.at[i, "error"] = reason


# --- runs ------------------------------------------------------------------------------------------------


def _runs(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    sql = f"""
        SELECT run_id, status, command, backbone, dataset, variant, preset, seed, s.last_step AS last_logged_step,
            runs.metric, t.result, started_at, coalesce(ended_at, heartbeat_at) AS ended_at, ended_at IS NULL AS open,
            date_diff('millisecond', started_at, coalesce(ended_at, heartbeat_at)) / 1000.0 AS duration_s,
            parent_run_id, test_split, out_dir, error, pid, host
        FROM runs
        LEFT JOIN (SELECT run_id, max(step) AS last_step FROM metrics GROUP BY run_id) s USING (run_id)
        LEFT JOIN (SELECT run_id, name, arg_max(value, step) AS result FROM metrics WHERE split = 'test'
                   GROUP BY ALL) t ON t.run_id = runs.run_id AND t.name = runs.metric
        WHERE {IN_RUNS} ORDER BY {RUN_ORDER}
    """
    table = _fetch(con, sql, ids)
    _mark_stale(table)
    for i in table.index:
        if table.at[i, "open"] and table.at[i, "status"] == "running":  # still running: no end yet
            table.at[i, "ended_at"] = pd.NaT
    # the final score is a finished run's alone: a stopped run has none, whatever it validated on the way
    table.loc[table.status != "finished", "result"] = math.nan
    table.insert(table.columns.get_loc("last_logged_step"), "checkpoint_step",
                 pd.array([_checkpoint_step(run) for run in table.itertuples()], dtype="Int64"))
    return table.drop(columns=["open", "pid", "host"])


def _checkpoint_step(run: Any) -> int | None:
    """The step of the run's newest checkpoint, where a resume continues (a stopped run's own step, which its last
    logged row can lie a few steps before): read from the checkpoint folder, or for a finished run whose folder is
    not here, its last logged step (its final checkpoint is taken there). None when neither is known."""
    if isinstance(run.out_dir, str):
        saved = load_run_file(Path(run.out_dir) / "checkpoint")
        if saved is not None and isinstance(saved.get("step"), int):
            return saved["step"]
    if run.status == "finished" and not pd.isna(run.last_logged_step):
        return int(run.last_logged_step)
    return None


# --- ppl: the headline metric ----------------------------------------------------------------------------


def _headline_metrics(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    """The metric each run is judged by and its direction, as the run recorded them (its backbone chose)."""
    return _fetch(con, f"SELECT run_id, metric, higher_is_better FROM runs WHERE {IN_RUNS} ORDER BY {RUN_ORDER}",
                  ids)



def _last_metrics(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    sql = f"""
        SELECT run_id, split, name, arg_max(value, step) AS last, max(step) AS last_step
        FROM metrics WHERE {IN_RUNS} AND split IN ('validation', 'test') GROUP BY ALL
    """
    return _fetch(con, sql, ids)


def _ppl(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    spine = _per_run(con, ids).merge(_fetch(con, f"SELECT run_id, test_split, metric, higher_is_better FROM runs "
                                                 f"WHERE {IN_RUNS}", ids), on="run_id", how="left")
    last = _last_metrics(con, ids)
    rows = [_headline_row(run, last[last.run_id == run.run_id]) for run in spine.itertuples()]
    columns = ["run_id", "status", "variant", "metric", "validation", "validation_step", "test", "test_step",
               "test_split"]
    table = pd.DataFrame(rows, columns=columns).astype({"validation_step": "Int64", "test_step": "Int64"})
    best = best_validation(con, ids).drop(columns=["metric"])
    table = table.merge(best, on="run_id", how="left")
    order = ["run_id", "status", "variant", "metric", "best_validation", "best_validation_step", "test_at_best",
             "validation", "validation_step", "test", "test_step", "test_split"]
    return table[order]


def _headline_row(run: Any, last: pd.DataFrame) -> dict[str, Any]:
    """Final validation and final test values of the run's headline metric (NaN where not logged)."""
    name = run.metric if isinstance(run.metric, str) else None
    row: dict[str, Any] = {"run_id": run.run_id, "status": run.status, "variant": run.variant, "metric": name,
                           "test_split": run.test_split if isinstance(run.test_split, str) else "test"}
    for split in ("validation", "test"):
        hit = last[(last["split"] == split) & (last["name"] == name)]
        found = not hit.empty
        row[split] = float(hit.iloc[0]["last"]) if found else math.nan
        row[f"{split}_step"] = int(hit.iloc[0]["last_step"]) if found else None
    return row


def best_validation(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    """Per run: its headline metric, the best validation figure and the step of it (what the run recorded at
    its end, ``validation/best_<metric>`` and ``validation/best_step``; for a run that recorded none -- one
    still training, or recorded before them -- the best of its validation rows), and ``test_at_best``: its test
    figure where the test split scored that model (a finished run with ``train.select_best``), else NaN."""
    sql = f"""
        WITH r AS (
            SELECT run_id, metric, higher_is_better,
                coalesce(TRY_CAST(json_extract(config, '$.train.select_best') AS BOOLEAN), false) AS select_best
            FROM runs WHERE {IN_RUNS}),
        seen AS (
            SELECT run_id,
                CASE WHEN any_value(higher_is_better) THEN max(value) ELSE min(value) END AS value,
                CASE WHEN any_value(higher_is_better) THEN arg_max(step, value) ELSE arg_min(step, value) END AS step
            FROM metrics JOIN r USING (run_id)
            WHERE split = 'validation' AND name = r.metric AND NOT isnan(value) GROUP BY run_id),
        recorded AS (
            SELECT run_id, arg_max(value, step) FILTER (WHERE name = 'best_' || r.metric) AS value,
                arg_max(value, step) FILTER (WHERE name = 'best_step') AS step
            FROM metrics JOIN r USING (run_id) WHERE split = 'validation' GROUP BY run_id),
        test AS (
            SELECT run_id, arg_max(value, step) AS value FROM metrics JOIN r USING (run_id)
            WHERE split = 'test' AND name = r.metric GROUP BY run_id)
        SELECT r.run_id, r.metric, coalesce(recorded.value, seen.value) AS best_validation,
            CAST(coalesce(recorded.step, seen.step) AS BIGINT) AS best_validation_step,
            CASE WHEN r.select_best AND recorded.step IS NOT NULL THEN test.value END AS test_at_best
        FROM r LEFT JOIN seen USING (run_id) LEFT JOIN recorded USING (run_id) LEFT JOIN test USING (run_id)
    """
    table = _fetch(con, sql, ids)
    table["best_validation_step"] = table["best_validation_step"].astype("Int64")
    table["test_at_best"] = table["test_at_best"].astype(float)
    return table


# --- means over training ---------------------------------------------------------------------------------


def _prefer_logged_mean(
    con: duckdb.DuckDBPyConnection, ids: list[str], table: pd.DataFrame, name: str
) -> None:
    """Replace ``table[name]`` by the trainer's own mean over every step where the run logged one.

    The registry samples trainable parameters every log interval and states at decisions; an average of those
    samples drifts from the mean over steps (the last decision holds for fewer steps than the others), and the
    trainer's number is the one it printed at the end of the run.
    """
    sql = f"""
        SELECT run_id, arg_max(value, step) AS logged FROM metrics
        WHERE {IN_RUNS} AND split = 'train' AND name = $name GROUP BY run_id
    """
    logged = con.execute(sql, {"ids": ids, "name": name}).df()
    by_run = dict(zip(logged.run_id, logged.logged, strict=True))
    pairs = zip(table.run_id, table[name], strict=True)
    table[name] = [by_run.get(run_id, sampled) for run_id, sampled in pairs]


# --- params ----------------------------------------------------------------------------------------------


def _params(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    sql = f"""
        SELECT run_id, avg(trainable_params) AS trainable_params_mean,
            arg_max(trainable_params, step) AS trainable_params_end,
            max(trainable_params) AS trainable_params_max
        FROM memory WHERE {IN_RUNS} AND trainable_params IS NOT NULL GROUP BY run_id
    """
    table = _per_run(con, ids).merge(_fetch(con, sql, ids), on="run_id", how="left")
    _prefer_logged_mean(con, ids, table, "trainable_params_mean")
    conventional = _conventional_params(con, ids, table)
    table["trainable_params_conventional"] = table.run_id.map(conventional).astype(float)
    table["reduction_mean"] = table.trainable_params_conventional / table.trainable_params_mean
    return table


def _conventional_params(con: duckdb.DuckDBPyConnection, ids: list[str], table: pd.DataFrame) -> dict[str, float]:
    """The run's parameter count without tying: logged as a metric, else derived from its own history."""
    logged = _fetch(
        con,
        f"SELECT run_id, max(value) AS value FROM metrics WHERE {IN_RUNS} AND name = 'conventional_params' "
        "GROUP BY run_id",
        ids,
    )
    result: dict[str, float] = dict(zip(logged.run_id, logged.value, strict=True))
    memory = _fetch(
        con, f"SELECT run_id, step, trainable_params FROM memory WHERE {IN_RUNS} AND trainable_params > 0", ids
    )
    ties = _fetch(con, f"SELECT run_id, step, independent_layers, len(state) AS layers FROM ties WHERE {IN_RUNS}", ids)
    for run in table.itertuples():
        if run.run_id in result:
            continue
        derived = _derive_conventional(memory[memory.run_id == run.run_id], ties[ties.run_id == run.run_id])
        if derived is None and run.variant == "no-tying":
            derived = run.trainable_params_max
        if derived is not None and not pd.isna(derived):
            result[run.run_id] = float(derived)
    return result


def _derive_conventional(memory: pd.DataFrame, ties: pd.DataFrame) -> float | None:
    """Fit trainable = shared + per_block * independent over the run, then evaluate at all L blocks.

    Each memory sample is paired with the state of the last decision strictly before it; samples taken at a
    decision's own step are dropped, since whether they saw the old or new state is not recorded.
    """
    if memory.empty or ties.empty:
        return None
    layers = int(ties.layers.max())
    ties = ties.sort_values("step")
    samples = memory[~memory.step.isin(set(ties.step))].sort_values("step")
    paired = pd.merge_asof(samples, ties[["step", "independent_layers"]], on="step", allow_exact_matches=False)
    by_count = paired.dropna(subset=["independent_layers"]).groupby("independent_layers").trainable_params.median()
    if layers in by_count.index:
        return float(by_count[layers])
    if len(by_count) < 2:
        return None
    low, high = by_count.index.min(), by_count.index.max()
    per_block = (by_count[high] - by_count[low]) / (high - low)
    if per_block <= 0:
        return None
    return float(round(by_count[low] + per_block * (layers - low)))


# --- layers ----------------------------------------------------------------------------------------------


# A "decision" is a choice of the policy: decision 0 in the ties table is the initial state, logged so the
# schedule is complete, and is counted by no table (agent, layers and layer-counts agree on the number).
_DECIDED = "decision > 0"


def _layer_counts(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    # state[i] == i means block i owns its weights; DuckDB lists are 1-based, blocks 0-based.
    sql = f"""
        SELECT run_id, idx - 1 AS layer, count(*) FILTER (WHERE target = idx - 1) AS independent_decisions,
            count(*) AS decisions
        FROM (SELECT run_id, unnest(state) AS target, generate_subscripts(state, 1) AS idx
              FROM ties WHERE {IN_RUNS} AND {_DECIDED})
        GROUP BY run_id, idx ORDER BY {RUN_ORDER}, layer
    """
    table = _fetch(con, sql, ids)
    table["independent_fraction"] = table.independent_decisions / table.decisions
    return table


def _layers(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    sql = f"""
        SELECT run_id, count(*) FILTER (WHERE {_DECIDED}) AS decisions, max(len(state)) AS layers,
            avg(independent_layers) AS independent_layers_mean,
            arg_max(independent_layers, decision) AS independent_layers_end,
            arg_max(distinct_block_weights, decision) AS distinct_block_weights_end,
            -- Distinct weight storages must equal independent blocks; any other count means shared storage.
            count(*) FILTER (WHERE distinct_block_weights <> independent_layers) AS weight_mismatches,
            avg(changed_blocks) FILTER (WHERE {_DECIDED}) AS changed_blocks_mean
        FROM ties WHERE {IN_RUNS} GROUP BY run_id
    """
    table = _per_run(con, ids).merge(_fetch(con, sql, ids), on="run_id", how="left")
    _prefer_logged_mean(con, ids, table, "independent_layers_mean")
    counts = _layer_counts(con, ids)
    per_layer = counts.groupby("run_id", sort=False).independent_decisions.agg(lambda c: [int(v) for v in c])
    table["independent_decisions_per_layer"] = table.run_id.map(per_layer)
    return table


# --- agent: does the policy settle? -----------------------------------------------------------------------


def _agent(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    # Decision 0 is the initial state, not a choice: it is left out of every per-decision mean.
    decided = f"""
        SELECT run_id, count(*) AS decisions, avg(greedy_agreement) AS greedy_agreement_mean,
            avg(q_spread) AS q_spread_mean, avg(td_loss) AS td_loss_mean,
            avg(CASE WHEN greedy_moves IS NULL THEN NULL WHEN greedy_moves > 0 THEN 1.0 ELSE 0.0 END)
                AS greedy_moved_share,
            avg(greedy_moves) AS greedy_moves_mean
        FROM decisions WHERE {IN_RUNS} AND {_DECIDED} GROUP BY run_id
    """
    changed = f"""
        SELECT run_id, avg(changed_blocks) AS changed_blocks_mean
        FROM ties WHERE {IN_RUNS} AND {_DECIDED} GROUP BY run_id
    """
    table = _per_run(con, ids).merge(_fetch(con, decided, ids), on="run_id", how="left")
    table = table.merge(_fetch(con, changed, ids), on="run_id", how="left")
    states = _fetch(
        con, f"SELECT run_id, decision, state FROM ties WHERE {IN_RUNS} ORDER BY run_id, decision", ids
    )
    lifetimes = {run_id: independent_lifetime([list(s) for s in rows.state]) for run_id, rows in
                 states.groupby("run_id", sort=False)}
    table["independent_lifetime_mean"] = table.run_id.map(lifetimes).astype(float)
    table["decisions"] = table.decisions.fillna(0).astype(int)
    table = table.merge(_differs_from_q_off(con, ids), on="run_id", how="left")
    table["differs_from_q_off"] = table.differs_from_q_off.astype("Int64")
    columns = ["run_id", "status", "variant", "decisions", "changed_blocks_mean", "greedy_moved_share", "greedy_moves_mean",
               "greedy_agreement_mean", "q_spread_mean", "td_loss_mean", "independent_lifetime_mean",
               "differs_from_q_off"]
    return table[columns]


def _differs_from_q_off(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    """Per dynamic run of a study: how many of its decisions left a tie state other than the state its ``q-off``
    twin (the run of the same study and seed whose Q-network is never consulted) had after the same decision. The
    twin has the same agent, random stream and settings, so a decision differs only where the learned values,
    directly or through an earlier move, changed it. Runs with no twin among the runs asked for get none."""
    from dyntie_cli.results.study import STUDY_NAME
    from dyntie_cli.variants import METHOD

    sql = f"""
        WITH r AS (SELECT run_id, variant, seed, {STUDY_NAME} AS study FROM runs WHERE {IN_RUNS}),
        twin AS (
            SELECT a.run_id, min(b.run_id) AS twin FROM r a JOIN r b
                ON a.study = b.study AND a.seed = b.seed AND b.variant = 'q-off' AND a.variant = '{METHOD}'
            GROUP BY a.run_id)
        SELECT twin.run_id, count(*) FILTER (WHERE x.state <> y.state) AS differs_from_q_off
        FROM twin JOIN ties x ON x.run_id = twin.run_id
            JOIN ties y ON y.run_id = twin.twin AND y.decision = x.decision
        WHERE x.{_DECIDED} GROUP BY twin.run_id"""
    return _fetch(con, sql, ids)


def independent_lifetime(states: Sequence[Sequence[int]]) -> float:
    """Mean length, in decisions, of a block's spells of independence (consecutive states with s[i] == i).

    Block 0 is left out: it is independent by definition and would only add one spell as long as the run.
    A spell still open at the last decision counts with the length seen so far, so a block that never
    re-ties scores the rest of the run. NaN when no block other than 0 was ever independent.
    """
    spells: list[int] = []
    blocks = len(states[0]) if states else 0
    for block in range(1, blocks):
        length = 0
        for state in states:
            if state[block] == block:
                length += 1
            elif length:
                spells.append(length)
                length = 0
        if length:
            spells.append(length)
    return sum(spells) / len(spells) if spells else math.nan


# --- memory ----------------------------------------------------------------------------------------------


def _memory(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    # process_peak_bytes: the whole process from its first byte (setup and the final evaluation included; on CPU
    # what /usr/bin/time reports); training_peak_bytes: the largest of the per-logging-interval peaks
    sql = f"""
        SELECT run_id, string_agg(DISTINCT device, ',') AS device, count(*) AS samples,
            greatest(max(process_peak_bytes), max(p.value)) AS process_peak_bytes,
            max(peak_bytes) AS training_peak_bytes, avg(peak_bytes) AS avg_training_peak_bytes,
            avg(current_bytes) AS avg_current_bytes,
            avg(param_bytes) AS param_bytes_mean, max(param_bytes) AS param_bytes_peak,
            avg(grad_bytes) AS grad_bytes_mean, max(grad_bytes) AS grad_bytes_peak,
            avg(optimizer_bytes) AS optimizer_bytes_mean, max(optimizer_bytes) AS optimizer_bytes_peak,
            -- The device-independent account: what parameters, gradients and optimizer state occupy.
            max(param_bytes + grad_bytes + optimizer_bytes) AS training_state_bytes_peak
        FROM memory LEFT JOIN (SELECT run_id, max(value) AS value FROM metrics
                               WHERE split = 'train' AND name = 'process_peak_bytes' GROUP BY run_id) p USING (run_id)
        WHERE {IN_RUNS} GROUP BY run_id
    """
    return _per_run(con, ids).merge(_fetch(con, sql, ids), on="run_id", how="left")


# --- raw rows --------------------------------------------------------------------------------------------


def _ties(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    sql = f"""
        SELECT run_id, decision, step, state, action, independent_layers, distinct_block_weights, changed_blocks
        FROM ties WHERE {IN_RUNS} ORDER BY {RUN_ORDER}, decision, step
    """
    return _fetch(con, sql, ids)


def _decisions(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    sql = f"""
        SELECT run_id, decision, step, epsilon, explored, reward, q_predicted, q_target, td_loss,
            greedy_agreement, q_spread, ppl
        FROM decisions WHERE {IN_RUNS} ORDER BY {RUN_ORDER}, decision, step
    """
    return _fetch(con, sql, ids)


# --- the paper's table and comparisons -------------------------------------------------------------------


def _train_timing(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    """Training speed from one figure: the median step time (evaluation, checkpoints and setup excluded; wall_s
    has them) and the tokens (examples) per step divided by it, so the two ratios of a comparison are exact
    reciprocals. Averaging the logged per-interval values instead weights them differently (a mean of
    tokens/s is dominated by the fast intervals, a mean of step times by the slow ones), and on a machine
    whose load changes during a run the two ratios can then point in opposite directions."""
    sql = f"""
        WITH per_log AS (
            SELECT run_id, step,
                max(value) FILTER (WHERE name = 'step_time_s') AS step_time,
                max(value) FILTER (WHERE name = 'tokens_per_s') AS tokens_per_s
            FROM metrics WHERE {IN_RUNS} AND split = 'train' AND name IN ('step_time_s', 'tokens_per_s')
            GROUP BY run_id, step
        )
        SELECT run_id, median(step_time) AS step_time_s,
            -- tokens_per_s * step_time is the run's (constant) tokens per step; a run that logged no step
            -- time keeps the median of its tokens/s
            coalesce(median(tokens_per_s * step_time) / nullif(median(step_time), 0), median(tokens_per_s))
                AS tokens_per_s
        FROM per_log GROUP BY run_id
    """
    agent = f"""
        SELECT run_id, arg_max(value, step) AS agent_time_s FROM metrics
        WHERE {IN_RUNS} AND name = 'agent_time_s' GROUP BY run_id
    """
    return _fetch(con, sql, ids).merge(_fetch(con, agent, ids), on="run_id", how="outer")


def _summary(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    """One row per run with every key figure, the source of ``paper`` and ``compare``."""
    table = _ppl(con, ids).drop(columns=["validation_step", "test_step"])
    # The run's score: the final test row, or the last validation value when no test row was logged; a run that
    # did not finish has none (its last validation is a step on the way, in the validation row of compare)
    has_test = table.test.notna()
    finished = table.status == "finished"
    table["result"] = table.test.where(has_test, table.validation).where(finished)
    result_split = table.test_split.where(has_test, "validation").where(finished, "no result: " + table.status)
    table["metric"] = [
        f"{m} ({s})" if isinstance(m, str) else None for m, s in zip(table.metric, result_split, strict=True)
    ]
    parts = [
        _params(con, ids).drop(columns=["variant", "status"]),
        _layers(con, ids)[["run_id", "independent_layers_mean", "independent_layers_end"]],
        _memory(con, ids)[["run_id", "process_peak_bytes", "training_peak_bytes", "avg_current_bytes",
                           "training_state_bytes_peak"]],
        _train_timing(con, ids),
        _runs(con, ids)[["run_id", "duration_s"]],
    ]
    for part in parts:
        table = table.merge(part, on="run_id", how="left")
    return table


PAPER_ROWS = [
    ("variant", "variant"),
    ("status", "status"),
    ("metric", "metric"),
    ("result", "result"),
    # model selection: the best validation figure, its step, and the test figure of that model (empty where the
    # test scored another one: train.select_best false, or a run recorded before it)
    ("best_validation", "best_validation"),
    ("best_validation_step", "best_validation_step"),
    ("test_at_best", "test_at_best"),
    ("trainable_params_conventional", "trainable_params_conventional"),
    ("trainable_params_mean", "trainable_params_mean"),
    ("trainable_params_end", "trainable_params_end"),
    ("independent_layers_mean", "independent_layers_mean"),
    ("independent_layers_end", "independent_layers_end"),
    ("process_peak_bytes", "process_peak_bytes"),  # the whole process, from its first byte
    ("training_peak_bytes", "training_peak_bytes"),  # the largest per-interval peak while training
    ("avg_memory_bytes", "avg_current_bytes"),  # allocated (CUDA) / resident (CPU) bytes averaged over steps
]
COMPARE_ROWS = [
    *PAPER_ROWS,
    ("validation", "validation"),
    ("training_state_bytes_peak", "training_state_bytes_peak"),
    ("tokens_per_s", "tokens_per_s"),  # tokens per step / the median step time: training steps only
    ("step_time_s", "step_time_s"),  # the median over the run
    ("agent_time_s", "agent_time_s"),
    ("wall_s", "duration_s"),  # the whole run: setup, training, evaluations, checkpoints
]


def _transpose(summary: pd.DataFrame, rows: list[tuple[str, str]]) -> pd.DataFrame:
    """Quantities as rows, one column per run: the layout of the paper's table."""
    data: dict[str, list[Any]] = {"quantity": [label for label, _ in rows]}
    for run in summary.to_dict("records"):
        data[run["run_id"]] = [_plain(run[column]) for _, column in rows]
    return pd.DataFrame(data, dtype=object)


def _plain(value: Any) -> Any:
    """Python scalars (None for missing) so a column mixing text and numbers renders and serialises cleanly."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def _paper(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    return _transpose(_summary(con, ids), PAPER_ROWS)


def main_job_and_ablations(con: duckdb.DuckDBPyConnection) -> list[str] | None:
    """The runs the paper table shows when none is named: the main job -- the newest finished dynamic run, of gpt2
    when there is one (``lineage.newest_finished``) -- then the runs trained from it, finished ones first, newest
    first. None (every run) when the registry has no finished dynamic run."""
    main = newest_finished(con)
    if main is None:
        return None
    rows = con.execute("SELECT run_id FROM runs WHERE parent_run_id = ? "
                       "ORDER BY status = 'finished' DESC, started_at DESC NULLS LAST, run_id DESC", [main]).fetchall()
    return [main, *(row[0] for row in rows)]


def _ratio(value: Any, base: Any) -> float | None:
    numeric = isinstance(value, (int, float)) and isinstance(base, (int, float))
    if not numeric or isinstance(value, bool) or not base:
        return None
    return value / base


def _compare(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    table = _transpose(_summary(con, ids), COMPARE_ROWS)
    if not ids:
        return table
    first = ids[0]
    # Ratio columns are named "<run> / <first run>"; report.tables shows them as ratios, never as bytes.
    for run_id in ids[1:]:
        ratios = [_ratio(value, base) for value, base in zip(table[run_id], table[first], strict=True)]
        table[f"{run_id} / {first}"] = pd.Series(ratios, dtype=object)
    return table


# --- rows the plots draw ---------------------------------------------------------------------------------


def _tie_rows(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    return _fetch(con, f"SELECT run_id, decision, step, state FROM ties WHERE {IN_RUNS} ORDER BY run_id, decision",
                  ids)


def _memory_rows(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    sql = f"""
        SELECT run_id, step, peak_bytes, param_bytes + grad_bytes + optimizer_bytes AS training_state_bytes
        FROM memory WHERE {IN_RUNS} AND (peak_bytes IS NOT NULL OR param_bytes IS NOT NULL)
        ORDER BY run_id, step
    """
    return _fetch(con, sql, ids)


def _validation_steps(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    sql = f"""
        SELECT DISTINCT run_id, step FROM metrics WHERE {IN_RUNS} AND split = 'validation' ORDER BY run_id, step
    """
    return _fetch(con, sql, ids)


def _param_rows(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    sql = f"""
        SELECT m.run_id, m.step, m.trainable_params, c.conventional
        FROM memory m LEFT JOIN (
            SELECT run_id, max(value) AS conventional FROM metrics
            WHERE {IN_RUNS} AND name = 'conventional_params' GROUP BY run_id) c USING (run_id)
        WHERE m.{IN_RUNS} AND m.trainable_params IS NOT NULL ORDER BY m.run_id, m.step
    """
    return _fetch(con, sql, ids)


def _evaluation_rows(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    sql = f"""
        SELECT run_id, step, split, name, value FROM metrics
        WHERE {IN_RUNS} AND split IN ('validation', 'test') ORDER BY run_id, step
    """
    return _fetch(con, sql, ids)


# --- the named queries -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NamedQuery:
    build: Builder
    description: str
    table: bool = True  # a report table (`dyntie report --table NAME`); False: rows for plots and commands
    #: the columns that answer the table's question, shown however narrow the terminal (the first column always
    #: is; names, or patterns such as "* / *" for every ratio column); the others fill what room is left
    headline: tuple[str, ...] = ()
    #: the runs it shows when none is named (None: every run, most recent first)
    default: Callable[[duckdb.DuckDBPyConnection], list[str] | None] | None = None


def _bench(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    from dyntie_cli.results.bench import bench_table

    return bench_table(con, ids)


def _study(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    from dyntie_cli.results.study import study_table

    return study_table(con, ids)


def _evidence(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    from dyntie_cli.results.evidence import evidence_table

    return evidence_table(con, ids)


def _study_curves(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    from dyntie_cli.results.study import study_curves

    return study_curves(con, ids)


QUERIES: dict[str, NamedQuery] = {
    "runs": NamedQuery(_runs, "One row per run: identity, status, the step of its newest checkpoint (where a "
                               "resume continues) and of its last logged row, its final score (finished runs "
                               "only), timing.",
                       headline=("status", "variant", "checkpoint_step", "result")),
    "ppl": NamedQuery(_ppl, "Per run: the headline metric's best validation figure and its step, the test figure "
                            "of that model (test_at_best), the last validation and test values, and the split "
                            "'test' means.", headline=("variant", "metric", "best_validation", "test_at_best")),
    "params": NamedQuery(_params, "Per run: trainable parameters mean over training, at the end, the maximum, "
                                  "and without tying.",
                         headline=("variant", "trainable_params_mean", "reduction_mean")),
    "layers": NamedQuery(_layers, "Per run: tie decisions (the initial state not counted, as in the agent "
                                  "table), independent layers mean and end, and the decisions after which each "
                                  "layer was independent.",
                         headline=("variant", "independent_layers_mean", "independent_layers_end")),
    "layer-counts": NamedQuery(_layer_counts, "Long form of the per-layer counts (run_id, layer, "
                                              "independent_decisions, decisions, fraction).",
                               headline=("layer", "independent_decisions", "independent_fraction")),
    # process_peak_bytes is the whole process's peak: the figure the README and the bench lead with
    "memory": NamedQuery(_memory, "Per run: peak and average memory, and parameter / gradient / optimizer bytes.",
                         headline=("variant", "process_peak_bytes", "avg_current_bytes",
                                   "training_state_bytes_peak")),
    "ties": NamedQuery(_ties, "The tie state after every decision.",
                       headline=("decision", "step", "independent_layers")),
    "decisions": NamedQuery(_decisions, "The agent's view of every decision: exploration, reward, Q values, TD "
                                        "loss, diagnostics.",
                            headline=("decision", "step", "explored", "reward", "td_loss")),
    "agent": NamedQuery(_agent, "Per run: tie decisions (the initial state not counted, as in the layers "
                                "table), blocks re-targeted per decision, greedy agreement, Q spread, TD loss, "
                                "how long a block stays independent, and, for a study's dynamic runs, how many "
                                "decisions differ from the q-off run of the same seed.",
                        headline=("variant", "changed_blocks_mean", "greedy_agreement_mean")),
    # paper, compare and bench are transposed: their quantities are rows, which no width drops; of their run
    # columns the ratios come first
    "paper": NamedQuery(_paper, "The paper's table: one column per run, one row per quantity; without --run, the "
                                "main job (the newest finished dynamic run, of gpt2 when there is one) and the "
                                "runs trained from it.", default=main_job_and_ablations),
    "compare": NamedQuery(_compare, "Key figures side by side, with each run's ratio to the first run. "
                                    "step_time_s is the median step; tokens_per_s the tokens per step over it "
                                    "(so their ratios are reciprocals); wall_s the whole run, evaluations and "
                                    "checkpoints included.", headline=("* / *",)),
    "bench": NamedQuery(_bench, "Speed and memory of bench runs, with ratios to their no-tying run.",
                        headline=("* / *",)),
    "study": NamedQuery(_study, "Per study and variant: each run's best validation figure over seeds (mean, std, "
                                "range), its step, the test figure of that model, the ratio to no-tying, "
                                "independent blocks, and the paired difference to dynamic.",
                        headline=("variant", "metric", "mean", "test at best, mean", "mean / no-tying",
                                  "minus dynamic, mean")),
    "evidence": NamedQuery(_evidence, "Per group of comparable runs (backbone, blocks, steps, cadence) and reward "
                                      "(the one their policy acted on, and each one probed on the same decisions, "
                                      "as -log ppl): what one newly untied or tied block changed the reward of its "
                                      "decision, by least squares with one level per decision, with standard "
                                      "errors, and the reward's noise: the evidence an agent can learn from.",
                           headline=("reward", "untie_effect", "untie_se", "tie_effect", "tie_se",
                                     "reward_noise_sd")),
    "variants": NamedQuery(_per_run, "Run id, status and variant of each run.", table=False),
    "headline-metrics": NamedQuery(_headline_metrics, "The metric each run is judged by and whether higher is "
                                                      "better.", table=False),
    "tie-rows": NamedQuery(_tie_rows, "Decision, step and state of every decision (the ties plot).", table=False),
    "memory-rows": NamedQuery(_memory_rows, "Peak and training-state bytes per logging step (the memory plot).",
                              table=False),
    "validation-steps": NamedQuery(_validation_steps, "The steps each run validated at (marked on the memory plot).",
                                   table=False),
    "param-rows": NamedQuery(_param_rows, "Trainable parameters per logging step and the conventional count.",
                             table=False),
    "evaluation-rows": NamedQuery(_evaluation_rows, "Every validation and test metric row (the metrics plot).",
                                  table=False),
    "study-curves": NamedQuery(_study_curves, "Validation rows of a study's runs with variant and seed (the study "
                                              "plot).", table=False),
}
REPORT_TABLES = tuple(name for name, q in QUERIES.items() if q.table and name != "compare")


def run_query(name: str, db: str | os.PathLike[str], run_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """The named query over ``run_ids`` (None: every run), its headline columns in ``attrs["headline"]``; an
    unknown name is a usage error listing the known ones."""
    query = QUERIES.get(name)
    if query is None:
        raise UsageError(f"No report table '{name}'; choose one of: {', '.join(REPORT_TABLES)}.")
    table = _query(db, run_ids, query)
    table.attrs["headline"] = query.headline  # what report.tables keeps at any width
    return table


def query_rows(con: duckdb.DuckDBPyConnection, name: str, ids: list[str]) -> pd.DataFrame:
    """A named query on an open connection, for callers that run several on the same resolved runs."""
    return QUERIES[name].build(con, ids)
