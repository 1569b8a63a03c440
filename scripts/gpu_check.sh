#!/usr/bin/env bash
# GPU check (issue 6): conventional vs dynamic tying on the paper's GPT-2 shape (48 x 1600, ~1.6B parameters),
# bf16 autocast, a few dozen steps, each variant in its own process; prints the bench table with the
# peak-memory ratio. Runs offline: embedded WikiText-2 and the GPT-2 BPE from the test fixtures.
# Usage: bash scripts/gpu_check.sh [STEPS] [BATCH]
# Set DYNTIE to a dyntie command that is already installed (for example "python3 -m dyntie_cli") to skip
# making the .venv-gpu virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-40}
batch=${2:-4}
if [ -z "${DYNTIE:-}" ]; then
  python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -q -e .
  DYNTIE=.venv-gpu/bin/dyntie
fi
export DYNTIE_CACHE=${DYNTIE_CACHE:-$PWD/.gpu-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$DYNTIE bench gpt2 --preset gpt2-paper --device cuda --max-steps "$steps" \
  --variants no-tying,dynamic --set data.tokenizer=tests/fixtures/gpt2 --set data.batch_size="$batch" \
  --set train.eval_items=16384 --set train.test_items=16384 --set train.eval_every=0 --set train.log_every=10 \
  --db gpu-bench.duckdb --out gpu-runs --format markdown
