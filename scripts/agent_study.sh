#!/usr/bin/env bash
# Issue 7's study: the default agent against random, replay, its own final architecture and no-tying on
# gpt2-deep-cpu (48 x 128, WikiText-2), equal steps, two seeds; chosen and reported on validation only.
# Quality only (no timings), so two runs may share the 2 cores, one thread each (OMP_NUM_THREADS=1).
# Usage: scripts/agent_study.sh OUTDIR [STEPS]   (about 2 x 5 runs of STEPS steps; 300 steps: ~11 min a run)
set -eu
out=${1:-study}; steps=${2:-300}
mkdir -p "$out"; cd "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
common=(--db study.duckdb --out runs --quiet)
base=(--preset gpt2-deep-cpu --max-steps "$steps" --set train.test_items=8192)
one_seed() {
  local seed=$1 src
  dyntie ablate --variant no-tying --backbone gpt2 "${base[@]}" --seed "$seed" "${common[@]}" > "no-tying-$seed.txt"
  dyntie ablate --variant random --backbone gpt2 "${base[@]}" --seed "$seed" "${common[@]}" > "random-$seed.txt"
  dyntie train gpt2 "${base[@]}" --seed "$seed" "${common[@]}" > "dynamic-$seed.txt"
  src=$(sed -n 's/^run_id: //p' "dynamic-$seed.txt")
  for v in final-arch replay; do
    dyntie ablate --variant "$v" --from-run "$src" "${common[@]}" > "$v-$seed.txt"
  done
}
one_seed 0 & one_seed 1 & wait
dyntie report --table paper --db study.duckdb --format markdown > paper.md
dyntie report --table agent --db study.duckdb --format markdown > agent.md
cat paper.md agent.md
