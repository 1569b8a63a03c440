"""Predicted against measured peak memory on the CPU presets, for conventional training and dynamic tying.

Each run trains in its own process (so its peak is its own); the dynamic run's prediction is made at the most
independent blocks it actually reached (its budget caps the plan made before training). Prints a Markdown table.

Usage: python scripts/plan_check.py OUTDIR [--steps N] [--glue-dir DIR] [--only PRESET,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import duckdb

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
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    db = a.out / "plan-check.duckdb"
    common = ["--max-steps", str(a.steps), "--set", "train.eval_every=0", "--set", "train.log_every=5",
              "--set", "train.eval_items=4096", "--set", "train.test_items=4096"]
    rows = []
    only = {p for p in a.only.split(",") if p}
    for command, backbone, preset in CASES:
        if only and preset[1] not in only:
            continue
        extra = ["--data-dir", a.glue_dir] if backbone == "glue" and a.glue_dir else []
        for variant in ("no-tying", "dynamic"):
            args = [*preset, *extra, *common, "--variant", variant]
            dyntie(command, backbone, *args, "--db", str(db), "--out", str(a.out / "runs"), "--quiet")
            con = duckdb.connect(str(db), read_only=True)
            run_id, = con.execute("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1").fetchone()
            measured = con.execute("SELECT greatest(max(m.process_peak_bytes), max(x.value)) FROM memory m, metrics x "
                                   "WHERE m.run_id = ? AND x.run_id = m.run_id AND x.name = 'process_peak_bytes'",
                                   [run_id]).fetchone()[0]
            reached = con.execute("SELECT max(independent_layers) FROM ties WHERE run_id = ?", [run_id]).fetchone()[0]
            con.close()
            plan_args = [*args] + (["--max-independent", str(reached)] if variant == "dynamic" else [])
            plan = json.loads(dyntie("plan", command, backbone, *plan_args, "--variants", variant, "--format", "json"))[0]
            rows.append((preset[1], variant, reached, plan["peak_bytes"], measured, plan))
    print("| preset | variant | independent (max reached) | predicted peak | measured process peak | predicted / measured |")
    print("|---|---|---|---|---|---|")
    for preset, variant, reached, predicted, measured, _ in rows:
        print(f"| {preset} | {variant} | {reached} | {predicted / 2**20:,.0f} MiB | {measured / 2**20:,.0f} MiB | "
              f"{predicted / measured:.3f} |")
    (a.out / "plan-check.json").write_text(json.dumps([dict(zip(("preset", "variant", "independent", "predicted",
                                                                 "measured", "plan"), r)) for r in rows], indent=1))


if __name__ == "__main__":
    main()
