#!/usr/bin/env bash
# The agent study at the long horizon, on one GPU: the gpt2-deep-cpu shape (48 x 128, WikiText-2) at 10x the CPU
# study's 300 steps, every variant, three seeds. One `dyntie study` process per seed, each with its own registry file
# and four runs at once (dynamic, no-tying, random and q-off first; final-arch, replay and grow from that seed's
# dynamic run when it has finished), so up to 12 small runs share the device; `dyntie merge` then puts the registries
# together and the study table (markdown) and its validation curves are written.
#
# Usage: bash scripts/gpu_study.sh [STEPS] [SEEDS]            (defaults: 3000 and 0,1,2)
# Environment (all optional):
#   DYNTIE     an installed dyntie command (for example "python3 -m dyntie_cli"); otherwise .venv-gpu is made
#   DEVICE     cuda (cpu to try the script at a tiny size), PRESET gpt2-deep-cpu, JOBS 4 (runs at once per seed)
#   BUDGET_S   420: after this many seconds every study is sent SIGTERM; its runs checkpoint and stop, the table
#              shows what finished, and running the script again (same OUT) continues the rest
#   OUT        gpu-study (registries, checkpoints, logs, the table and the plot)
# Sizing (an estimate: no GPU run yet): a 48 x 128 model at 8 x 128 tokens a step is bound by kernel launches, a few
# tens of ms a step; twelve processes share the device in two rounds of 3,000 steps inside BUDGET_S. Quality only:
# the runs are compared on validation perplexity, never timed.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-3000}
seeds=${2:-0,1,2}
device=${DEVICE:-cuda}
preset=${PRESET:-gpt2-deep-cpu}
jobs=${JOBS:-4}
budget=${BUDGET_S:-420}
out=${OUT:-gpu-study}
name="$preset-$steps-gpu"
if [ -z "${DYNTIE:-}" ]; then
  python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -q -e .
  DYNTIE=.venv-gpu/bin/dyntie
fi
export DYNTIE_CACHE=${DYNTIE_CACHE:-$PWD/.gpu-cache}
export OMP_NUM_THREADS=1  # many processes on one machine: one CPU thread each
mkdir -p "$out"
if [ "$device" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
start=$SECONDS

# the tokenizer and the token cache, made once before the studies read them in parallel
$DYNTIE train gpt2 --preset "$preset" --device "$device" --max-steps 1 --set train.eval_items=256 \
  --set train.test_items=256 --db "$out/warm-up.duckdb" --out "$out/warm-up" --quiet > /dev/null

# evaluations at a sixth of the run and at the end; the test split is scored once, on 8,192 tokens
every=$(( steps / 6 > 0 ? steps / 6 : 1 ))
left=$(( budget - (SECONDS - start) ))
pids=()
for seed in ${seeds//,/ }; do
  # past the budget, timeout sends SIGTERM: the study stops its runs at their next step (each checkpoints)
  timeout --signal=TERM "$(( left > 1 ? left : 1 ))" $DYNTIE study gpt2 --preset "$preset" --device "$device" \
    --max-steps "$steps" --seeds "$seed" --variants dynamic,no-tying,final-arch,replay,random,grow,q-off \
    --jobs "$jobs" --name "$name" --set train.eval_every="$every" --set train.test_items=8192 \
    --db "$out/seed$seed.duckdb" --out "$out/runs" --format markdown > "$out/seed$seed.md" 2> "$out/seed$seed.log" &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for seed in ${seeds//,/ }; do tail -n 2 "$out/seed$seed.log"; done

registries=("$out"/seed*.duckdb)
[ -e "${registries[0]}" ] || { echo "no run started within the budget"; exit 1; }
$DYNTIE merge "${registries[@]}" --db "$out/study.duckdb"
$DYNTIE report --table study --study "$name" --db "$out/study.duckdb" --format markdown | tee "$out/study.md"
$DYNTIE report --plot study --study "$name" --db "$out/study.duckdb" --out "$out/study.png" || true
echo "elapsed: $(( SECONDS - start )) s; every study finished: $([ "$status" = 0 ] && echo yes || echo no)"
exit "$status"
