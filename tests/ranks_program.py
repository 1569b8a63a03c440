"""A tiny GPT-2 trained with dynamic tying, by ``DynamicTying`` in a plain loop (``loop``) or by a transformers
``Trainer`` with ``DynamicTyingCallback`` (``trainer``), in one process or in each rank of a torchrun launch.
Every rank writes what the tests compare to ``OUT/rank-R.json``: the tie history, the step losses and a digest
of its weights. The global batch is the same whatever the number of ranks (each rank takes its share), so one
process and two ranks train on the same examples at every step.

    python tests/ranks_program.py loop OUT [--steps N] [--stop-after K --save FILE] [--resume FILE]
    torchrun --nproc_per_node 2 tests/ranks_program.py trainer OUT [--steps N] [--stop-after K] [--resume]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch

GLOBAL_BATCH, SEQ, VOCAB = 8, 16, 64


def _model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ, use_cache=False,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        loss_type="ForCausalLM")
    return GPT2LMHeadModel(config)


def tying_options(variant: str) -> dict:
    """random changes the ties at every decision; the default agent with a small keep bias unties early."""
    return dict(decide_every=2, variant=variant, agent_options=dict(keep_bias=0.2), seed=1)


def _tokens(index: int) -> torch.Tensor:
    """Example ``index``: a sequence that counts up by a step of its own (learnable, and unlike its neighbours)."""
    start, stride = index % VOCAB, 1 + index % 3
    return (start + stride * torch.arange(SEQ)) % VOCAB


def _digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _write(out: Path, tying, losses: list[float], model, **extra) -> None:
    rank, world = _rank_world()
    out.mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "world": world, "states": [row.state for row in tying.history],
              "actions": [row.action for row in tying.history], "losses": losses, "digest": _digest(model),
              "rewards": [row.get("reward") for row in tying.log.decisions], "step": tying.loop.step,
              "averaged": tying.averaging.averaged if tying.averaging else 0, **extra}
    (out / f"rank-{rank}.json").write_text(json.dumps(record))


def run_loop(out: Path, variant: str, steps: int, stop_after: int | None = None, save: str | None = None,
             resume: str | None = None, db: str | None = None, accumulate: int = 1) -> None:
    from dyntie_cli import DynamicTying

    rank, world = _rank_world()
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tying = DynamicTying(model.transformer.h, optimizer, total_steps=steps, db=db, log_every=1,
                         **tying_options(variant))
    losses: list[float] = []
    first = 0
    if resume:
        saved = torch.load(resume, weights_only=False)
        tying.load_state_dict(saved["tying"])  # first: the tie state decides which parameters the model has
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        losses, first = saved["losses"], saved["step"]
    share = GLOBAL_BATCH // world
    for step in range(first, steps):
        batch = torch.stack([_tokens(step * GLOBAL_BATCH + rank * share + i) for i in range(share)])
        micro = share // accumulate
        for part in range(accumulate):  # the passes before the last only accumulate: averaged once, by the last
            with tying.no_sync() if part < accumulate - 1 else nullcontext():
                piece = batch[part * micro:(part + 1) * micro]
                (model(input_ids=piece, labels=piece).loss / accumulate).backward()
        with torch.no_grad():
            loss = model(input_ids=batch, labels=batch).loss  # the step's loss, before the update
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # on averaged gradients: the same on every rank
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tying.step(loss)
        if stop_after is not None and step + 1 == stop_after:
            if save and rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "tying": tying.state_dict(), "losses": losses, "step": step + 1}, save)
            _write(out, tying, losses, model)
            return
    tying.finish()
    _write(out, tying, losses, model)


class _Counting(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4096

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tokens = _tokens(i)
        return {"input_ids": tokens, "labels": tokens}


def run_trainer(out: Path, variant: str, steps: int, stop_after: int | None = None, resume: bool = False,
                accumulate: int = 1) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from dyntie_cli import DynamicTyingCallback

    _, world = _rank_world()
    model = _model()
    callback = DynamicTyingCallback(**tying_options(variant))

    class StopAfter(TrainerCallback):  # a run that dies after a checkpoint, in the middle of a step
        def on_step_end(self, args, state, control, **kwargs):
            if stop_after is not None and state.global_step == stop_after:
                _write(out, callback.tying, [], model)
                trainer.accelerator.end_training()
                raise SystemExit(0)

    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=steps, per_device_train_batch_size=GLOBAL_BATCH // world // accumulate,
        gradient_accumulation_steps=accumulate,
        learning_rate=3e-3, save_strategy="steps", save_steps=6, report_to="none", use_cpu=True,
        disable_tqdm=True, logging_steps=1, train_sampling_strategy="sequential", dataloader_num_workers=0,
        seed=0, data_seed=1)
    trainer = Trainer(model=model, args=args, train_dataset=_Counting(), callbacks=[callback, StopAfter()])
    trainer.train(resume_from_checkpoint=True if resume else None)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    _write(out, callback.tying, losses, model, wrapper=type(trainer.model_wrapped).__name__)
    trainer.accelerator.end_training()  # as accelerate asks at the end of a script


def _leave() -> None:
    """End the program's process once its record is written, without the interpreter's teardown: under torchrun
    a Trainer's rank can abort there ("terminate called without an active exception", with no Python frame
    left) after everything it did succeeded, which would fail a test about what it did."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("loop", "trainer"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--variant", default="random")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--save")
    parser.add_argument("--resume", nargs="?", const="yes")
    parser.add_argument("--db")
    parser.add_argument("--accumulate", type=int, default=1)
    a = parser.parse_args()
    torch.set_num_threads(1)
    if a.mode == "loop":
        run_loop(a.out, a.variant, a.steps, a.stop_after, a.save, a.resume, a.db, a.accumulate)
        if torch.distributed.is_initialized():  # the group DynamicTying joined: ended before the interpreter exits
            torch.distributed.destroy_process_group()
    else:
        try:
            run_trainer(a.out, a.variant, a.steps, a.stop_after, bool(a.resume), a.accumulate)
        except SystemExit as stop:  # the run stopped on purpose, its record written
            if stop.code:
                raise
    _leave()


if __name__ == "__main__":
    main()
