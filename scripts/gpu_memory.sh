#!/usr/bin/env bash
# Memory on a GPU: the paper's GPT-2 shape (48 x 1600, ~1.6B parameters, bf16) trained conventionally and with
# dynamic tying, each in its own process (setup and whole-process peaks, planned against measured), then the
# largest width at 48 blocks that trains conventionally and with dyntie on this device. About 6 minutes on one
# H100/H200; every step has its own timeout, so a rerun fits in the same device budget.
# Usage: bash scripts/gpu_memory.sh [STEPS] [BATCH]      (DYNTIE="python3 -m dyntie_cli" uses an installed dyntie)
set -uo pipefail
cd "$(dirname "$0")/.."
steps=${1:-30}
batch=${2:-4}
if [ -z "${DYNTIE:-}" ]; then
  python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -q -e .
  DYNTIE=.venv-gpu/bin/dyntie
  PY=.venv-gpu/bin/python
else
  PY=${PY:-python3}
fi
export DYNTIE_CACHE=${DYNTIE_CACHE:-$PWD/.gpu-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
common=(--set data.tokenizer=tests/fixtures/gpt2 --set data.batch_size="$batch" --set train.eval_every=0
        --set train.eval_items=16384 --set train.test_items=16384 --set train.log_every=5)
timeout 60 $DYNTIE plan train gpt2 --preset gpt2-paper --device cuda "${common[@]}" --format markdown
timeout 200 $DYNTIE bench gpt2 --preset gpt2-paper --device cuda --max-steps "$steps" --variants no-tying,dynamic \
  "${common[@]}" --db gpu-memory.duckdb --out gpu-runs --format markdown
timeout 150 $PY scripts/largest_width.py --preset gpt2-paper --device cuda --steps 3 \
  --set data.tokenizer=tests/fixtures/gpt2 --set data.batch_size="$batch" --db gpu-memory.duckdb
