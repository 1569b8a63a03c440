"""How the gradients of a tied model are best averaged over ranks: DistributedDataParallel rebuilt over the current
parameters at every tie change, or dyntie's own bucketed all-reduce at the end of each backward pass
(``DynamicTying``'s). Both train the same GPT-2 with the same tie schedule (``random``: a change at every
decision); each prints, per rank, the median and mean step time (the rebuilds included) and the process's peak
resident memory.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 scripts/ranks_allreduce_vs_ddp.py own
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 scripts/ranks_allreduce_vs_ddp.py ddp
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import GPT2Config, GPT2LMHeadModel

from dyntie_cli import DynamicTying

STEPS, DECIDE_EVERY, BATCH, SEQ, VOCAB, WIDTH = 40, 5, 8, 64, 512, 256


def main(mode: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=WIDTH, n_head=4, vocab_size=VOCAB, n_positions=SEQ, use_cache=False)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tying = DynamicTying(model.transformer.h, optimizer, total_steps=STEPS, decide_every=DECIDE_EVERY,
                         variant="random", seed=0)
    rank = tying.group.rank
    wrapped = model
    if mode == "ddp":
        tying.averaging.remove()  # DDP averages instead
        wrapped = DistributedDataParallel(model)
    generator = torch.Generator().manual_seed(rank)
    times, rebuilds = [], 0
    for _ in range(STEPS):
        t0 = time.perf_counter()
        batch = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
        loss = wrapped(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if tying.step(loss) and mode == "ddp":
            wrapped = DistributedDataParallel(model)  # over the parameters the model has now
            rebuilds += 1
        times.append(time.perf_counter() - t0)
    tying.finish()  # every rank holds the same weights, or this raises
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{mode} rank {rank}: median step {statistics.median(times) * 1000:.1f} ms, mean {statistics.mean(times) * 1000:.1f} "
          f"ms over {STEPS} steps ({rebuilds} DDP rebuilds), peak RSS {peak:.0f} MiB, "
          f"{tying.ties.independent_layers} of 12 blocks independent at the end", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
