"""The `study` table: a study's variants over its seeds, from the registry.

A run trained by `dyntie study` records ``{"study": {"name": NAME}}`` in ``runs.config``. The table has one row per
(study, variant) over the study's finished runs (the first finished run of each variant and seed):

* ``mean``, ``std`` (sample standard deviation, n - 1), ``min``, ``max`` and ``per seed``: the best validation figure
  of the headline metric its runs recorded (perplexity for language models, accuracy or MCC for classifiers), the
  one each run selected its model by; ``best step per seed``: the step of it;
* ``test at best, mean`` and ``per seed``: the test figure of that model (each run scores the test split once, on
  its best-on-validation model; empty for a run that scored its last model);
* ``mean / no-tying``: the mean over seeds of the per-seed ratio to the no-tying run of the same seed;
* ``independent mean`` (the mean over seeds of each run's step-weighted mean) and ``independent end``;
* ``minus dynamic, per seed`` and ``minus dynamic, mean``: the paired difference to the dynamic run of the same
  seed, and ``dynamic better``: on how many of the paired seeds dynamic's value is the better one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb

from dyntie_cli.errors import DyntieError, UsageError
from dyntie_cli.lazy_import import pandas as pd
from dyntie_cli.results.db import IN_RUNS, read_registry
from dyntie_cli.results.liveness import stale_reason
from dyntie_cli.settings import VARIANTS

COLUMNS = ["study", "variant", "seeds", "metric", "mean", "std", "min", "max", "per seed", "best step per seed",
           "test at best, mean", "test at best, per seed", "mean / no-tying", "independent mean", "independent end",
           "minus dynamic, per seed", "minus dynamic, mean", "dynamic better"]
# the study a run belongs to (`dyntie study` records its name in runs.config)
STUDY_NAME = "json_extract_string(config, '$.study.name')"


def study_title() -> str:
    return ("study: best validation value of each run, over seeds (its step: best step; test at best: the test split "
            "on that model; std: sample standard deviation; mean / no-tying: mean of the per-seed ratios; minus "
            "dynamic: paired per seed)")


def study_runs(con: duckdb.DuckDBPyConnection, name: str) -> list[dict[str, Any]]:
    """Every run of study ``name``, oldest first: run id, variant, seed, status (a run whose process is gone reads
    as killed, with ``alive`` False), config, out_dir."""
    rows = con.execute(f"""
        SELECT run_id, variant, seed, status, config, out_dir, pid, host FROM runs
        WHERE {STUDY_NAME} = ? ORDER BY started_at, run_id""", [name]).fetchall()
    runs = []
    for run_id, variant, seed, status, config, out_dir, pid, host in rows:
        stale = stale_reason(status, pid, host)
        runs.append({"run_id": run_id, "variant": variant, "seed": seed, "status": "killed" if stale else status,
                     "config": config, "out_dir": out_dir, "pid": pid})
    return runs


def study_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The studies in the registry, in the order they started."""
    rows = con.execute(f"""
        SELECT {STUDY_NAME} AS name FROM runs WHERE {STUDY_NAME} IS NOT NULL
        GROUP BY name ORDER BY min(started_at)""").fetchall()
    return [row[0] for row in rows]


def _finished(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    """The first finished run of each (study, variant, seed) among ``ids``, with the validation metrics it recorded
    (``name``: the best of each is what the study compares, :func:`~dyntie_cli.results.queries.best_validation`),
    its mean and end number of independent blocks."""
    sql = f"""
        WITH chosen AS (
            SELECT run_id, {STUDY_NAME} AS study, variant, seed, metric AS headline, higher_is_better FROM runs
            WHERE {IN_RUNS} AND status = 'finished' AND {STUDY_NAME} IS NOT NULL
            QUALIFY row_number() OVER (PARTITION BY study, variant, seed ORDER BY started_at, run_id) = 1),
        val AS (
            SELECT DISTINCT run_id, name FROM metrics WHERE {IN_RUNS} AND split = 'validation'),
        indep AS (
            SELECT run_id, arg_max(value, step) AS independent_mean FROM metrics
            WHERE {IN_RUNS} AND split = 'train' AND name = 'independent_layers_mean' GROUP BY run_id),
        ends AS (
            SELECT run_id, arg_max(independent_layers, decision) AS independent_end FROM ties
            WHERE {IN_RUNS} GROUP BY run_id)
        SELECT c.study, c.variant, c.seed, c.run_id, c.headline, c.higher_is_better, val.name,
               indep.independent_mean, ends.independent_end
        FROM chosen c LEFT JOIN val USING (run_id) LEFT JOIN indep USING (run_id) LEFT JOIN ends USING (run_id)
        ORDER BY c.study, c.variant, c.seed
    """
    return con.execute(sql, {"ids": ids}).df()


def study_variant_order(variant: str) -> int:
    """Rows and curves in the order of the variants' declaration (dynamic first)."""
    return VARIANTS.index(variant) if variant in VARIANTS else len(VARIANTS)


def study_table(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    """One row per (study, variant) over the finished study runs among ``ids`` (see the module's docstring)."""
    from dyntie_cli.results.queries import best_validation

    rows = _finished(con, ids)
    best = best_validation(con, ids).set_index("run_id")
    out: list[dict[str, Any]] = []
    for study in dict.fromkeys(rows.study):
        runs = rows[rows.study == study]
        metric, higher = study_metric(runs)
        picked = runs[runs.name == metric] if metric else runs.drop_duplicates(["variant", "seed"])
        value = {(r.variant, r.seed): (float(best.at[r.run_id, "best_validation"]) if metric else math.nan)
                 for r in picked.itertuples()}
        facts = {(r.variant, r.seed): (r, best.loc[r.run_id]) for r in picked.itertuples()}
        variants = sorted(dict.fromkeys(picked.variant), key=study_variant_order)
        for variant in variants:
            seeds = sorted(int(s) for v, s in value if v == variant)
            out.append(_variant_row(study, variant, seeds, (metric, higher), value, facts))
    return pd.DataFrame(out, columns=COLUMNS)


def study_metric(rows: pd.DataFrame) -> tuple[str | None, bool]:
    """The metric a study is judged by and whether higher is better: the one its runs recorded (``headline``,
    ``higher_is_better``), where they validated on it (``name``); (None, False) where they did not."""
    for metric, higher in zip(rows.headline, rows.higher_is_better, strict=True):
        if isinstance(metric, str) and metric in set(rows.name):
            return metric, bool(higher)
    return None, False


def _variant_row(study: str, variant: str, seeds: list[int], headline: tuple[str | None, bool],
                 value: dict[tuple[str, int], float], facts: dict[tuple[str, int], Any]) -> dict[str, Any]:
    metric, higher = headline
    values = [value[variant, s] for s in seeds]
    tests = [facts[variant, s][1].test_at_best for s in seeds]
    ratios = [value[variant, s] / value["no-tying", s] for s in seeds if ("no-tying", s) in value]
    paired = [s for s in seeds if ("dynamic", s) in value] if variant != "dynamic" else []
    diffs = [value[variant, s] - value["dynamic", s] for s in paired]
    better = sum(1 for d in diffs if (d < 0 if higher else d > 0))
    equal = sum(1 for d in diffs if d == 0)
    return {
        "study": study, "variant": variant, "seeds": seeds, "metric": metric,
        "mean": _mean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values), "max": max(values), "per seed": values,
        "best step per seed": [_whole(facts[variant, s][1].best_validation_step) for s in seeds],
        "test at best, mean": _mean(tests), "test at best, per seed": [None if pd.isna(t) else float(t) for t in tests],
        "mean / no-tying": _mean(ratios),
        "independent mean": _mean([facts[variant, s][0].independent_mean for s in seeds]),
        "independent end": _mean([facts[variant, s][0].independent_end for s in seeds]),
        "minus dynamic, per seed": diffs if diffs else None,
        "minus dynamic, mean": _mean(diffs),
        "dynamic better": (f"{better} of {len(diffs)}" + (f" ({equal} equal)" if equal else "")) if diffs else None,
    }


def _whole(value: Any) -> int | None:
    return None if pd.isna(value) else int(value)


def _mean(values: Sequence[Any]) -> float | None:
    present = [float(v) for v in values if v is not None and not pd.isna(v)]
    return sum(present) / len(present) if present else None


def study_curves(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pd.DataFrame:
    """Every validation row of the finished study runs among ``ids`` (the first finished run of each variant and
    seed), with the run's study, variant and seed: what the study plot draws."""
    sql = f"""
        WITH chosen AS (
            SELECT run_id, {STUDY_NAME} AS study, variant, seed FROM runs
            WHERE {IN_RUNS} AND status = 'finished' AND {STUDY_NAME} IS NOT NULL
            QUALIFY row_number() OVER (PARTITION BY study, variant, seed ORDER BY started_at, run_id) = 1)
        SELECT c.study, c.variant, c.seed, m.run_id, m.step, m.name, m.value, r.metric AS headline,
            r.higher_is_better
        FROM chosen c JOIN metrics m USING (run_id) JOIN runs r USING (run_id)
        WHERE m.split = 'validation' ORDER BY c.study, c.variant, c.seed, m.step
    """
    return con.execute(sql, {"ids": ids}).df()


def read_study_runs(db: Path, name: str) -> list[dict[str, Any]]:
    """``study_runs`` of the registry file ``db``; none when the file does not exist yet."""
    if not Path(db).exists():
        return []
    with read_registry(db) as con:
        return study_runs(con, name)


def study_run_ids(db: Path, name: str | None) -> list[str]:
    """The ids of study ``name``'s runs (None: the registry's only study); an unknown name is refused with the
    studies there are."""
    with read_registry(db) as con:
        names = study_names(con)
        if name is None:
            if len(names) != 1:
                listed = ", ".join(names) if names else "none"
                raise UsageError(f"Name the study with --study NAME (studies in {db}: {listed}).")
            name = names[0]
        if name not in names:
            listed = ", ".join(names) if names else "none"
            raise DyntieError(f"No study {name!r} in {db} (studies: {listed}); `dyntie study` records one.")
        return [run["run_id"] for run in study_runs(con, name)]
