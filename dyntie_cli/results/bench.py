"""The `bench` table: each run's speed and memory, with ratios to the no-tying run of its set (same preset, steps and
seed; a registry may hold several benches), and a dynamic run's also to its fixed-layout twin (the final-arch run
made from it: the same independent blocks from step 0, at equal steps), where the tie machinery's own cost shows as a
step-time ratio above 1. A bench trains its variants in turns; the twin trains in a later set of turns beside a
second run of the dynamic run (its rerun), so the twin's speed is compared with that rerun's, the two trained over
the same minutes, and with no-tying's through it. The runs of a repeated bench (`dyntie bench --repeat N`, each run's
config says its group, round and set) are pooled: medians over rounds, as the bench printed them."""

from __future__ import annotations

import duckdb

from dyntie_cli.lazy_import import pandas as pd
from dyntie_cli.results.db import IN_RUNS
from dyntie_cli.results.queries import best_validation
from dyntie_cli.variants import BASELINE, METHOD, RERUN

# the quantities `dyntie bench` reports, each also as a ratio to no-tying. process_peak_bytes is the headline:
# the whole process from its first byte (on CPU the RSS high-water mark, what /usr/bin/time reports; on CUDA peak
# allocated bytes since the process started), setup and the final evaluation included; training_peak_bytes is the
# largest per-logging-interval peak while training, planned_peak_bytes what the run's memory plan predicted before it
# started (for dynamic tying at its budget, which a short run may not reach) (avg_training_peak_bytes: their mean); base_bytes what the
# process held before the model was built (on CPU the libraries and data, ~0.7 GiB with torch and transformers),
# and process_peak_above_base_bytes the process peak less that: the part the tie state acts on
BENCH_COLUMNS = [
    "process_peak_bytes", "process_peak_above_base_bytes", "planned_peak_bytes", "training_peak_bytes",
    "avg_training_peak_bytes",
    "base_bytes", "setup_peak_bytes", "state_bytes_mean", "state_bytes_peak", "param_bytes_mean",
    "grad_bytes_mean", "optimizer_bytes_mean", "trainable_params_mean", "trainable_params_end", "tokens_per_s",
    "step_time_s", "validation_ppl", "best_validation_ppl", "best_validation_step", "test_ppl_at_best", "agent_share",
]
# validation_ppl is the last validation; best_validation_ppl the best of the run's validations, at
# best_validation_step, and test_ppl_at_best the test split on that model (the run's final score)
_NOT_RATIOS = ("agent_share", "best_validation_step")
# the quantities a machine's speed moves: two runs trained in different sets of turns are compared through the
# dynamic run and its rerun, which trained one in each set
_TIMED = ("tokens_per_s", "step_time_s")
# a repeated bench's lowest and highest per-round step-time ratio: how far one round could have been off
_ROUND_RANGE = ("step_time_s ratio, lowest round", "step_time_s ratio, highest round")
# the rows above the quantities: what each run ran on. threads: the CPU threads it trained with (runs.config), which
# a step time depends on as much as on the variant, so runs compared at different counts show it
_HEAD = ("device", "threads", "steps")
# a bench variant with memory savers (no-tying+checkpointing) is recorded as its variant with the bench's name for
# it in runs.config; the ratios' baseline is plain no-tying, and a dynamic run's twin is made from plain dynamic
_VARIANT = "coalesce(json_extract_string(config, '$.bench.variant'), variant)"
# the variant a dynamic run is also compared with: its final state, fixed from step 0 (parent_run_id: the dynamic run)
TWIN = "final-arch"


def _bench_rows(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    """One row per run: the bench quantities (not yet ratios), in the order of ``ids``."""
    sql = f"""
        WITH mem AS (
            SELECT run_id, any_value(device) AS device, max(peak_bytes) AS training_peak_bytes,
                avg(peak_bytes) AS avg_training_peak_bytes, max(process_peak_bytes) AS process_peak_rows,
                avg(param_bytes + grad_bytes + optimizer_bytes) AS state_bytes_mean,
                max(param_bytes + grad_bytes + optimizer_bytes) AS state_bytes_peak,
                avg(param_bytes) AS param_bytes_mean, avg(grad_bytes) AS grad_bytes_mean,
                avg(optimizer_bytes) AS optimizer_bytes_mean, arg_max(trainable_params, step) AS trainable_params_end
            FROM memory WHERE {IN_RUNS} GROUP BY run_id),
        train AS (
            SELECT run_id,
                median(value) FILTER (WHERE name = 'tokens_per_s') AS tokens_per_s,
                median(value) FILTER (WHERE name = 'step_time_s') AS step_time_s,
                arg_max(value, step) FILTER (WHERE name = 'agent_time_s') AS agent_time_s,
                max(value) FILTER (WHERE name = 'setup_peak_bytes') AS setup_peak_bytes,
                max(value) FILTER (WHERE name = 'process_peak_bytes') AS process_peak_end,
                max(value) FILTER (WHERE name = 'planned_peak_bytes') AS planned_peak_bytes,
                max(value) FILTER (WHERE name = 'base_bytes') AS base_bytes,
                arg_max(value, step) FILTER (WHERE name = 'wall_time_s') AS wall_time_s,
                arg_max(value, step) FILTER (WHERE name = 'trainable_params_mean') AS trainable_params_mean
            FROM metrics WHERE {IN_RUNS} AND split = 'train' GROUP BY run_id),
        val AS (
            SELECT run_id, arg_max(value, step) AS validation_ppl
            FROM metrics WHERE {IN_RUNS} AND split = 'validation' AND name = 'ppl' GROUP BY run_id)
        SELECT r.run_id, r.variant, r.preset, r.seed, r.parent_run_id, r.threads, r.bench_group, r.bench_round,
            r.bench_turns, r.device_steps AS steps, mem.*, train.*, val.validation_ppl
        FROM (SELECT run_id, {_VARIANT} AS variant, preset, seed, parent_run_id,
                     TRY_CAST(json_extract(config, '$.threads') AS INTEGER) AS threads,
                     json_extract_string(config, '$.bench.group') AS bench_group,
                     TRY_CAST(json_extract(config, '$.bench.round') AS INTEGER) AS bench_round,
                     TRY_CAST(json_extract(config, '$.bench.turns') AS INTEGER) AS bench_turns,
                     (SELECT max(step) FROM memory m WHERE m.run_id = runs.run_id) AS device_steps
              FROM runs WHERE {IN_RUNS}) r
        LEFT JOIN mem USING (run_id) LEFT JOIN train USING (run_id) LEFT JOIN val USING (run_id)
        ORDER BY list_position($ids::TEXT[], r.run_id)
    """
    df = con.execute(sql, {"ids": ids}).df()
    df = df.loc[:, ~df.columns.duplicated()]
    best = best_validation(con, ids)
    best = best[best.metric == "ppl"].rename(columns={"best_validation": "best_validation_ppl",
                                                      "test_at_best": "test_ppl_at_best"})
    df = df.merge(best.drop(columns=["metric"]), on="run_id", how="left")
    df["threads"] = [None if pd.isna(t) else int(t) for t in df["threads"]]  # runs from before it was recorded: None
    df["agent_share"] = df["agent_time_s"] / df["wall_time_s"]
    df["process_peak_bytes"] = df[["process_peak_rows", "process_peak_end"]].max(axis=1)
    df["process_peak_above_base_bytes"] = df["process_peak_bytes"] - df["base_bytes"]  # what the run added
    return df


def bench_title(repeat: int | None = None) -> str:
    """The bench table's title: for a bench of ``repeat`` rounds, or (None) for whatever the registry holds."""
    if repeat is None:
        return "bench (ratios: variant / no-tying, dynamic / final-arch; a repeated bench: medians over its rounds)"
    if repeat == 1:
        return "bench (ratios: variant / no-tying, dynamic / final-arch)"
    return (f"bench, {repeat} rounds (medians; ratios: median over rounds of variant / that round's no-tying, "
            "dynamic / that round's final-arch)")


def bench_table(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    """Runs of a repeated bench with at least two complete rounds pooled (``pooled_table``); any other run side
    by side with ratios to its no-tying run. Several groups, or a group beside other runs: columns named with
    the group, rows the union of both tables' quantities."""
    rows = _bench_rows(con, ids)  # every run's quantities, queried once
    groups = _repeated_groups(con, ids)
    pooled = {rid for rounds in groups.values() for r in rounds for rid in r.values()}
    single = rows[~rows["run_id"].isin(pooled)].reset_index(drop=True)
    if not groups:
        return _side_by_side(rows)
    if single.empty and len(groups) == 1:
        return pooled_table(rows, next(iter(groups.values())))
    # a run beside the groups keeps its own baseline, even when that no-tying run is pooled in a group
    parts = [_side_by_side(single, baselines=rows)] if not single.empty else []
    for group, rounds in groups.items():
        t = pooled_table(rows, rounds)
        parts.append(t.rename(columns={c: f"{c} [{group}]" for c in t.columns if c != "quantity"}))
    order = ["run_id", "rounds", *_HEAD, *BENCH_COLUMNS, *_ROUND_RANGE]
    merged = pd.concat([p.set_index("quantity") for p in parts], axis=1)
    return merged.reindex([q for q in order if q in merged.index]).rename_axis("quantity").reset_index()


def _repeated_groups(con: duckdb.DuckDBPyConnection, ids: list[str]) -> dict[str, list[dict[str, str]]]:
    """Repeated benches among ``ids``: group -> its rounds (variant -> run id, no-tying first), for groups with
    at least two rounds that finished a no-tying run; pooled are the variants every such round has (a run of
    another variant, or one picked without its round's other runs, stays a single run)."""
    rows = con.execute(f"""
        SELECT run_id, {_VARIANT} AS variant, json_extract_string(config, '$.bench.group') AS grp,
               CAST(json_extract(config, '$.bench.round') AS INTEGER) AS rnd
        FROM runs WHERE {IN_RUNS} AND status = 'finished' AND command = 'bench'
            AND json_extract_string(config, '$.bench.group') IS NOT NULL
        ORDER BY started_at""", {"ids": ids}).fetchall()
    found: dict[str, dict[int, dict[str, str]]] = {}
    for rid, variant, grp, rnd in rows:
        found.setdefault(grp, {}).setdefault(rnd, {})[variant] = rid
    groups = {}
    for grp, by_round in found.items():
        rounds = [r for _, r in sorted(by_round.items()) if BASELINE in r]
        common = set.intersection(*(set(r) for r in rounds)) if rounds else set()
        if len(rounds) >= 2 and len(common) >= 2:
            order = [BASELINE, *(v for v in rounds[0] if v in common and v not in (BASELINE, RERUN)),
                     *([RERUN] if RERUN in common else [])]
            groups[grp] = [{v: r[v] for v in order} for r in rounds]
    return groups


def pooled_table(rows: pd.DataFrame, rounds: list[dict[str, str]]) -> pd.DataFrame:
    """A bench repeated in rounds (``rounds[r]``: variant -> run id): per variant the median of each quantity
    over its rounds, and per quantity the median over rounds of the ratio to that round's no-tying run and, for
    dynamic, to that round's final-arch twin (``_between``: in speed through the round's dynamic run and its rerun
    where the two trained in different sets of turns), so a machine that slows down for a while shifts one round's
    pair, not the comparison; the rerun's own ratio is to the round's dynamic run. ``step_time_s`` ratios also get
    the lowest and highest of the per-round ratios: how far one bench could have been off. ``rows``: the runs'
    ``_bench_rows`` (more runs may be in it)."""
    df = rows.set_index("run_id", drop=False)
    variants = list(rounds[0])
    out = pd.DataFrame({"quantity": ["rounds", *_HEAD, *BENCH_COLUMNS, *_ROUND_RANGE]})
    for v in variants:
        runs = df.loc[[r[v] for r in rounds]]
        out[v] = [len(rounds), runs["device"].iloc[0], _threads(runs["threads"]), runs["steps"].iloc[0],
                  *(runs[c].median() for c in BENCH_COLUMNS), None, None]
        bases = [] if v == BASELINE else [METHOD] if v == RERUN else [BASELINE]
        if v == METHOD and TWIN in variants:
            bases.append(TWIN)
        for base in bases:
            per_round = []
            for r in rounds:
                row, base_row = df.loc[r[v]], df.loc[r[base]]
                bridge = (df.loc[r[METHOD]], df.loc[r[RERUN]]) if RERUN in r else None
                per_round.append({c: _between(row, base_row, c, bridge) for c in BENCH_COLUMNS})
            out[f"{v} / {base}"] = _pooled_ratios(per_round)
    return out


def _pooled_ratios(per_round: list[dict[str, float | None]]) -> list[float | None]:
    """A ratio column of ``pooled_table``: per quantity the median over rounds of the rounds' ratios."""
    ratios = {c: [r[c] for r in per_round if r[c] is not None] for c in BENCH_COLUMNS}
    steps = ratios["step_time_s"]
    return [None, *(None for _ in _HEAD), *(float(pd.Series(ratios[c]).median()) if ratios[c] else None
                                            for c in BENCH_COLUMNS),
            min(steps) if steps else None, max(steps) if steps else None]


def _threads(per_round: pd.Series) -> int | str | None:
    """A pooled variant's thread count: the one every round used, else each round's in order ("2, 1")."""
    known = [int(t) for t in per_round if pd.notna(t)]
    if not known:
        return None
    return known[0] if len(set(known)) == 1 else ", ".join(str(t) for t in known)


def _baseline(df: pd.DataFrame, row: pd.Series, more: pd.DataFrame | None = None) -> pd.Series:
    """The run a row is compared with, among ``df``'s runs, else among ``more``: its own bench's no-tying run (same
    group and round), for a bench's rerun of the dynamic run that round's dynamic run; else a no-tying run with the
    same preset, steps and seed; else the first no-tying run, else the first run. A no-tying run is its own."""
    if row["variant"] == BASELINE:
        return row
    rerun = row["variant"] == RERUN
    for frame in (df, more):
        if frame is None:
            continue
        bench = (frame["bench_group"] == row["bench_group"]) & (frame["bench_round"] == row["bench_round"])
        is_base = frame["variant"] == (METHOD if rerun else BASELINE)
        settings = (frame["preset"] == row["preset"]) & (frame["steps"] == row["steps"]) & (frame["seed"] == row["seed"])
        candidates = [frame[is_base & bench]]
        if not rerun:  # a rerun is compared with its own round's dynamic run only
            candidates.append(frame[is_base & settings])
        for same in candidates:
            if not same.empty:
                return same.iloc[0]
    base = df[df["variant"] == BASELINE]
    return (base if not base.empty else df).iloc[0]


def _bridge(df: pd.DataFrame, row: pd.Series, more: pd.DataFrame | None = None) -> tuple[pd.Series, pd.Series] | None:
    """For a run of a bench in turns: its round's dynamic run and that run's rerun (in that order: the first and the
    second set of turns), among ``df``'s runs or ``more``; None where the round has no rerun."""
    if pd.isna(row["bench_turns"]):
        return None
    for frame in (df, more):
        if frame is None:
            continue
        bench = frame[(frame["bench_group"] == row["bench_group"]) & (frame["bench_round"] == row["bench_round"])]
        method, rerun = bench[bench["variant"] == METHOD], bench[bench["variant"] == RERUN]
        if not method.empty and not rerun.empty:
            return method.iloc[0], rerun.iloc[0]
    return None


def _twin(df: pd.DataFrame, row: pd.Series, more: pd.DataFrame | None = None) -> pd.Series | None:
    """A dynamic run's fixed-layout twin: the final-arch run made from it, among ``df``'s runs or ``more``."""
    if row["variant"] != METHOD:
        return None
    for frame in (df, more):
        if frame is not None:
            twins = frame[(frame["variant"] == TWIN) & (frame["parent_run_id"] == row["run_id"])]
            if not twins.empty:
                return twins.iloc[0]
    return None


def _side_by_side(df: pd.DataFrame, baselines: pd.DataFrame | None = None) -> pd.DataFrame:
    """Quantities as rows; per run a value column and (but for a baseline) a ratio column, and for a dynamic
    run with its final-arch twin a ratio column to that twin. ``baselines``: more runs a baseline (or twin) may
    come from when ``df`` has none that matches; one not shown is named by its id's end."""
    names = dict(zip(df["run_id"], _column_names(df)))
    out = pd.DataFrame({"quantity": ["run_id", *_HEAD, *BENCH_COLUMNS]})
    for _, row in df.iterrows():
        name = names[row["run_id"]]
        out[name] = [row["run_id"], *(row[c] for c in _HEAD), *(row[c] for c in BENCH_COLUMNS)]
        bridge = _bridge(df, row, baselines)
        for base in (_baseline(df, row, baselines), _twin(df, row, baselines)):
            if base is None or row["run_id"] == base["run_id"]:
                continue
            ratios = [_between(row, base, c, bridge) for c in BENCH_COLUMNS]
            base_name = names.get(base["run_id"], f"{base['variant']} ({base['run_id'][-4:]})")
            out[f"{name} / {base_name}"] = [None, *(None for _ in _HEAD), *ratios]
    return out


def _ratio(row: pd.Series, base: pd.Series, column: str) -> float | None:
    """``row``'s quantity over the baseline's; None where either is missing or the baseline's is 0, for
    agent_share, already a share of wall time (a ratio to no-tying's near-zero share means nothing), and for a
    step."""
    if column in _NOT_RATIOS or pd.isna(row[column]) or pd.isna(base[column]) or not base[column]:
        return None
    return float(row[column] / base[column])


def _between(row: pd.Series, base: pd.Series, column: str,
             bridge: tuple[pd.Series, pd.Series] | None) -> float | None:
    """``row``'s quantity over ``base``'s. A timed quantity of two runs that trained in different sets of turns (a
    variant made from the dynamic run against no-tying, the dynamic run against its twin) goes through ``bridge``,
    the round's dynamic run and its rerun, one trained beside each: each run is compared only with a run of its own
    set, so the machine's drift between the sets cancels (the dynamic run against its rerun is that drift). Other
    quantities do not drift: compared directly."""
    pair = {row["run_id"], base["run_id"]}
    if column in _TIMED and bridge is not None and row["bench_turns"] != base["bench_turns"] \
            and pair != {run["run_id"] for run in bridge}:  # the bridge's own ratio: the drift between the sets
        method, rerun = bridge
        near_row, near_base = (method, rerun) if row["bench_turns"] == method["bench_turns"] else (rerun, method)
        to_bridge, across = _ratio(row, near_row, column), _ratio(near_base, base, column)
        return to_bridge * across if to_bridge is not None and across is not None else None
    return _ratio(row, base, column)


def _column_names(df: pd.DataFrame) -> list[str]:
    counts = df["variant"].value_counts()
    return [v if counts[v] == 1 else f"{v} ({rid[-4:]})" for v, rid in zip(df["variant"], df["run_id"])]
