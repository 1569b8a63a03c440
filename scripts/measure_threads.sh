#!/usr/bin/env bash
# The main job's step time alone and beside a competing CPU-bound process (a busy loop), for a thread setting.
# Usage: scripts/measure_threads.sh OUTDIR LABEL [extra dyntie train flags, e.g. --threads 1]
# Prints one line per condition: the median and mean of the per-interval median step times (100 steps of
# gpt2-cpu, evaluation off) and the load average before the run. Run it with `dyntie` on PATH.
set -u
out=${1:?OUTDIR}; label=${2:?LABEL}; shift 2
mkdir -p "$out"
steps=${STEPS:-100}
train() {  # $1: registry name, then extra flags
  local name=$1; shift
  dyntie train gpt2 --max-steps "$steps" --set train.eval_every=0 --set train.test_items=8192 \
    --db "$out/$name.duckdb" --out "$out/runs" --quiet "$@" > "$out/$name.txt" 2>&1 || { echo "failed: $name"; cat "$out/$name.txt"; }
}
summary() {  # $1: registry name, $2: load average before
  python - "$out/$1.duckdb" "$1" "$2" <<'PY'
import statistics, sys, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
rid, threads = con.execute("SELECT run_id, config->>'$.threads' FROM runs ORDER BY started_at DESC").fetchone()
st = [v for (v,) in con.execute("SELECT value FROM metrics WHERE run_id = ? AND name = 'step_time_s' "
                               "ORDER BY step", [rid]).fetchall()]
wall = con.execute("SELECT max(value) FROM metrics WHERE run_id = ? AND name = 'wall_time_s'", [rid]).fetchone()[0]
print(f"{sys.argv[2]:<28} threads {threads or '-':>2}  median step {statistics.median(st):.3f} s  mean "
      f"{statistics.mean(st):.3f} s  loop {wall:.0f} s  load before {sys.argv[3]}")
PY
}
load() { cut -d' ' -f1 /proc/loadavg; }
l=$(load); train "$label-alone" "$@"; summary "$label-alone" "$l"
python -c "while True: pass" & busy=$!
sleep 5
l=$(load); train "$label-busy" "$@"; summary "$label-busy" "$l"
kill "$busy"
