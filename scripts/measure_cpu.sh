#!/usr/bin/env bash
# The CPU figures in the README, one after another (run on a quiet machine; about 1.5 hours on 2 cores;
# a busy machine makes OpenMP threads wait on each other and every step many times slower).
# Usage: scripts/measure_cpu.sh OUTDIR
set -u
out=${1:-measure}
mkdir -p "$out"
cd "$out"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a times.txt; }
t() { local start=$(date +%s); "$@"; local rc=$?; log "rc=$rc $(( $(date +%s) - start ))s: $*"; }

# 1. the README's first command: gpt2-cpu on the embedded WikiText-2
t dyntie train gpt2 --db main.duckdb --out runs > main.txt 2>&1
# 2. bench: deep (activations dominate) and wide (parameters and optimizer state dominate)
t dyntie bench gpt2 --preset gpt2-deep-cpu --max-steps 300 --variants no-tying,dynamic --set train.test_items=8192 \
  --repeat 2 --db bench.duckdb --out runs --format markdown > bench-deep.md 2> bench-deep.err
t dyntie bench gpt2 --preset gpt2-wide-cpu --max-steps 100 --variants no-tying,dynamic --set train.test_items=16384 \
  --db bench.duckdb --out runs --format markdown > bench-wide.md 2> bench-wide.err
# the same two benches with the lean agent (the README's second ratio column; a bench holds several sets)
t dyntie bench gpt2 --preset gpt2-deep-cpu --max-steps 300 --variants no-tying,dynamic --set train.test_items=8192 \
  --agent lean --db bench-lean.duckdb --out runs --format markdown > bench-deep-lean.md 2> bench-deep-lean.err
t dyntie bench gpt2 --preset gpt2-wide-cpu --max-steps 100 --variants no-tying,dynamic --set train.test_items=16384 \
  --agent lean --db bench-lean.duckdb --out runs --format markdown > bench-wide-lean.md 2> bench-wide-lean.err
# 3. the paper's ablations on gpt2-cpu at equal steps (the README's figures are from an earlier default agent;
#    issue 7's two-seed study on gpt2-deep-cpu is scripts/agent_study.sh)
t dyntie train gpt2 --max-steps 300 --db ablate.duckdb --out runs --quiet > ablate-source.txt 2>&1
src=$(sed -n 's/^run_id: //p' ablate-source.txt)
for v in final-arch replay no-tying random static-cycle; do
  t dyntie ablate --variant "$v" --from-run "$src" --db ablate.duckdb --out runs --quiet > "ablate-$v.txt" 2>&1
done
dyntie report --table paper --db ablate.duckdb --format markdown > ablate-paper.md
dyntie report --plot ties --run "$src" --db ablate.duckdb --out ties.png
log done
