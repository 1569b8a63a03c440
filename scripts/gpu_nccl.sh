#!/usr/bin/env bash
# Several ranks on NCCL: with two or more GPUs, `dyntie train` on two ranks (torchrun, one GPU each): every rank
# takes rank 0's decisions and the run ends by checking that the ranks' weights are identical; with one GPU, the
# collectives dyntie's process group uses (the bucketed gradient all-reduce, broadcasts, gathers, the weight check)
# on a one-rank NCCL group, then `dyntie train` on that GPU under torchrun. Prints the run's tie history.
# Usage: bash scripts/gpu_nccl.sh [STEPS]
# DRY_RUN=1 runs the same on the CPU with gloo (as two GPUs would; DRY_RUN=1 GPUS=1 as one), a check of the script.
# Set DYNTIE_PYTHON to a Python with dyntie installed to skip making the .venv-gpu virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-60}
if [ -z "${DYNTIE_PYTHON:-}" ]; then
  python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -q -e .
  DYNTIE_PYTHON=.venv-gpu/bin/python
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
out=$(mktemp -d "${TMPDIR:-/tmp}/dyntie-nccl.XXXX")
if [ "${DRY_RUN:-0}" = 1 ]; then
  device=cpu gpus=${GPUS:-2}
else
  device=cuda
  gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
ranks=$(( gpus >= 2 ? 2 : 1 ))
if [ "$ranks" = 1 ]; then
  echo "one GPU: dyntie's collectives on a one-rank NCCL group"
  DEVICE=$device $DYNTIE_PYTHON -m torch.distributed.run --standalone --nproc_per_node 1 - <<'EOF'
import os

import torch
import torch.distributed as dist
from torch import nn

from dyntie_cli.core.distributed import BackwardAverage, Group


class OneRank(Group):  # a group of one takes every collective as a group of many would
    active = True


cuda = os.environ["DEVICE"] == "cuda"
dist.init_process_group("nccl" if cuda else "gloo")
group = OneRank(1, 0, 0)
group.device = torch.device("cuda", 0) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(group.device)
model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1)).to(group.device)
averaging = BackwardAverage(group, model[0], model.parameters)
model(torch.randn(4, 8, device=group.device)).sum().backward()  # the all-reduce runs at the end of the pass
group.broadcast_parameters(model)
assert group.broadcast({"action": [0, 1]}) == {"action": [0, 1]} and group.gather(3) == [3]
assert group.mean(2.0) == 2.0 and group.any(True)
group.check_identical(model)
averaging.remove()
print(f"{dist.get_backend()} collectives: ok")
dist.destroy_process_group()
EOF
fi
$DYNTIE_PYTHON -m torch.distributed.run --standalone --nproc_per_node "$ranks" -m dyntie_cli train gpt2 \
  --preset gpt2-tiny --device "$device" --max-steps "$steps" --decide-every 5 --set agent.keep_bias=0.2 \
  --db "$out/nccl.duckdb" --out "$out/runs" --quiet
$DYNTIE_PYTHON -m dyntie_cli report --table ties --db "$out/nccl.duckdb"
$DYNTIE_PYTHON -m dyntie_cli report --table runs --db "$out/nccl.duckdb"
echo "ranks: $ranks on $device; registry $out/nccl.duckdb"
