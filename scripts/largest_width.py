"""The largest width of a 48-block GPT-2 that trains conventionally, and the largest that trains with dynamic
tying under a budget, on this device: found with the memory plan, then each checked by training a few steps.

Usage: python scripts/largest_width.py [--preset gpt2-paper] [--device cuda] [--budget 8] [--steps 3]
       [--limit-gib G] [--widths 1024,1600,...] [--db FILE] [--set KEY=VALUE ...]
--limit-gib plans against G GiB instead of the device's free memory (for a dry run on a small machine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from dyntie_cli.commands.options import TrainingOptions
from dyntie_cli.core.loop import resolve_device
from dyntie_cli.core.plan import plan_memory
from dyntie_cli.runner.settings_source import new_settings


def plan(preset: str, device: str, width: int, variant: str, budget: int, sets: list[str]) -> dict:
    opts = TrainingOptions({"preset": preset, "device": device, "max_independent": budget,
                            "sets": [*sets, f"model.n_embd={width}", f"model.n_head={max(1, width // 64)}"]})
    backbone, cfg = new_settings("gpt2", opts.sources())
    data = backbone.load_data(cfg)
    return plan_memory(backbone, cfg, data, resolve_device(device), [variant])[0].to_dict()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt2-paper")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--limit-gib", type=float, default=None)
    ap.add_argument("--widths", default="1024,1280,1600,2048,2560,3072,3584,4096,5120,6144,7168,8192")
    ap.add_argument("--db", default="largest-width.duckdb")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    a = ap.parse_args()
    widths = [int(w) for w in a.widths.split(",")]
    found = {}
    for variant in ("no-tying", "dynamic"):
        best = None
        for width in widths:
            p = plan(a.preset, a.device, width, variant, a.budget, a.sets)
            limit = a.limit_gib * 2**30 if a.limit_gib else p["available_bytes"]
            fits = p["peak_bytes"] <= limit
            print(json.dumps({"variant": variant, "width": width, "predicted_gib": p["peak_bytes"] / 2**30,
                              "limit_gib": limit / 2**30, "fits": fits}), flush=True)
            if not fits:
                break
            best = (width, p)
        found[variant] = best
    for variant, best in found.items():
        if best is None:
            print(f"{variant}: no width in the list fits")
            continue
        width, p = best
        cmd = [sys.executable, "-m", "dyntie_cli", "train", "gpt2", "--preset", a.preset, "--device", a.device,
               "--variant", variant, "--max-independent", str(a.budget), "--max-steps", str(a.steps),
               "--set", f"model.n_embd={width}", "--set", f"model.n_head={max(1, width // 64)}",
               "--set", "train.eval_every=0", "--set", "train.eval_items=1024", "--set", "train.test_items=1024",
               "--set", "train.log_every=1", *[part for s in a.sets for part in ("--set", s)], "--db", a.db,
               "--quiet"]
        run = subprocess.run(cmd, capture_output=True, text=True, check=False)
        status = "trained" if run.returncode == 0 else f"failed: {(run.stderr.strip().splitlines() or [''])[-1]}"
        print(f"{variant}: largest width {width} (predicted {p['peak_bytes'] / 2**30:.1f} GiB): {status}")


if __name__ == "__main__":
    main()
