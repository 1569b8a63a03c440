"""Predicted against measured peak memory on the CPU presets, for conventional training and dynamic tying, each
plain or with memory savers (activation checkpointing, a low-memory optimizer: the bench's variants.SAVERS).

Each run trains in its own process (so its peak is its own); the dynamic run's prediction is made at the most
independent blocks it actually reached (its budget caps the plan made before training). Prints a Markdown table.
``--from-registry DB`` trains nothing: it plans each finished run of a registry (a `dyntie bench`'s) instead.

Usage: python scripts/plan_check.py OUTDIR [--steps N] [--glue-dir DIR] [--only PRESET,...]
           [--savers ,checkpointing,adamw8bit,...] [--from-registry DB]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import duckdb

from dyntie_cli.variants import with_savers

CASES = [
    ("train", "gpt2", ["--preset", "gpt2-wide-cpu"]),
    ("train", "gpt2", ["--preset", "gpt2-deep-cpu"]),
    ("train", "llama", ["--preset", "llama-wide-cpu"]),
    ("train", "llama", ["--preset", "llama-deep-cpu"]),
    ("train", "vit", ["--preset", "vit-cpu", "--dataset", "digits"]),
    ("finetune", "glue", ["--preset", "bert-cpu", "--task", "rte"]),
]


def dyntie(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "dyntie_cli", *args], capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"dyntie {' '.join(args)} failed: {out.stderr.strip().splitlines()[-1:]}")
    return out.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--glue-dir", default=None)
    ap.add_argument("--only", default="", help="comma-separated presets to check (default: all four)")
    ap.add_argument("--savers", default="", help="comma-separated memory savers, each alone or joined with + "
                    "(an empty entry: none), e.g. ',checkpointing,adamw8bit'")
    ap.add_argument("--from-registry", type=Path, default=None, help="plan the finished runs of this registry")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    if a.from_registry:
        for run_id, command, backbone, preset, name in _finished(a.from_registry):
            variant, pairs = with_savers(name)
            args = ["--preset", preset, *(x for k, v in pairs for x in ("--set", f"{k}={v}"))]
            rows.append(_check(a.from_registry, run_id, command, backbone, preset, name, variant, args))
    else:
        db = a.out / "plan-check.duckdb"
        common = ["--max-steps", str(a.steps), "--set", "train.eval_every=0", "--set", "train.log_every=5",
                  "--set", "train.eval_items=4096", "--set", "train.test_items=4096"]
        only = {p for p in a.only.split(",") if p}
        for command, backbone, preset in CASES:
            if only and preset[1] not in only:
                continue
            extra = ["--data-dir", a.glue_dir] if backbone == "glue" and a.glue_dir else []
            for savers in a.savers.split(","):
                for variant in ("no-tying", "dynamic"):
                    name = "+".join(x for x in (variant, *savers.split("+")) if x)
                    _, pairs = with_savers(name)
                    sets = [x for k, v in pairs for x in ("--set", f"{k}={v}")]
                    args = [*preset, *extra, *common, *sets, "--variant", variant]
                    dyntie(command, backbone, *args, "--db", str(db), "--out", str(a.out / "runs"), "--quiet")
                    con = duckdb.connect(str(db), read_only=True)
                    run_id, = con.execute("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1").fetchone()
                    con.close()
                    rows.append(_check(db, run_id, command, backbone, preset[1], name, variant, args))
    print("| preset | variant | independent (max reached) | predicted peak | measured process peak | predicted / measured |")
    print("|---|---|---|---|---|---|")
    for preset, variant, reached, predicted, measured, _ in rows:
        print(f"| {preset} | {variant} | {reached} | {predicted / 2**20:,.0f} MiB | {measured / 2**20:,.0f} MiB | "
              f"{predicted / measured:.3f} |")
    (a.out / "plan-check.json").write_text(json.dumps([dict(zip(("preset", "variant", "independent", "predicted",
                                                                 "measured", "plan"), r)) for r in rows], indent=1))


def _finished(db: Path) -> list[tuple]:
    """(run id, command, backbone, preset, bench name) of each finished training run of a registry."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT run_id, CASE WHEN backbone = 'glue' THEN 'finetune' ELSE 'train' END, backbone, "
                           "preset, coalesce(json_extract_string(config, '$.bench.variant'), variant) FROM runs "
                           "WHERE status = 'finished' AND variant IN ('no-tying', 'dynamic') ORDER BY started_at"
                           ).fetchall()
    finally:
        con.close()


def _check(db: Path, run_id: str, command: str, backbone: str, preset: str, name: str, variant: str,
           args: list[str]) -> tuple:
    """The run's measured whole-process peak beside `dyntie plan`'s prediction for it."""
    con = duckdb.connect(str(db), read_only=True)
    measured = con.execute("SELECT greatest(max(m.process_peak_bytes), max(x.value)) FROM memory m, metrics x "
                           "WHERE m.run_id = ? AND x.run_id = m.run_id AND x.name = 'process_peak_bytes'",
                           [run_id]).fetchone()[0]
    reached = con.execute("SELECT max(independent_layers) FROM ties WHERE run_id = ?", [run_id]).fetchone()[0]
    con.close()
    plan_args = [a for a in args if a not in ("--variant", variant)]
    plan_args += ["--max-independent", str(reached)] if variant == "dynamic" else []
    plan = json.loads(dyntie("plan", command, backbone, *plan_args, "--variants", variant, "--format", "json"))[0]
    return preset, name, reached, plan["peak_bytes"], measured, plan


if __name__ == "__main__":
    main()
