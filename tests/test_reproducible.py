"""Fixed-seed runs reproduce a recorded run: the same tie states, actions, decisions and metrics.

Each case trains a tiny preset through the real CLI and compares what it logged with a record kept in
``fixtures/reproducible/``. Any change that alters a run's numbers (a refactoring that reorders random draws,
a different initialisation, a changed default) fails here, so it cannot go unnoticed. Integers (states,
actions, counts, bytes) must match exactly; floats to 1e-4 relative (the records were made with one thread, as
the suite runs; float32 kernels differ between CPU instruction sets, AVX2 or AVX-512, by up to about 1e-5
relative over these short runs, while a changed draw or formula moves them by far more).

To record again after a deliberate change of behaviour: ``DYNTIE_WRITE_RECORDS=1 pytest
tests/test_reproducible.py`` (and say why in the commit).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tests.conftest import invoke
from tests.conftest import rows as _rows

FIXTURES = Path(__file__).parent / "fixtures"
RECORDS = FIXTURES / "reproducible"
WRITE = os.environ.get("DYNTIE_WRITE_RECORDS") == "1"

#: metrics that measure time or the process, not the run's numbers
_MACHINE_METRICS = ("step_time_s", "tokens_per_s", "agent_time_s", "wall_time_s", "setup_peak_bytes",
                    "base_bytes", "process_peak_bytes", "planned_peak_bytes")

CASES = {
    "gpt2-default": ["train", "gpt2", "--preset", "gpt2-tiny", "--max-steps", "40", "--decide-every", "4"],
    "llama-paper": ["train", "llama", "--preset", "llama-tiny", "--max-steps", "40", "--decide-every", "4",
                    "--agent", "paper"],
    "gpt2-paper": ["train", "gpt2", "--preset", "gpt2-tiny", "--max-steps", "40", "--decide-every", "4",
                   "--agent", "paper"],
    "glue-paper": ["finetune", "glue", "--task", "rte", "--preset", "bert-tiny", "--data-dir", FIXTURES / "glue",
                   "--max-steps", "20", "--decide-every", "4", "--agent", "paper"],
    "vit-paper": ["train", "vit", "--preset", "vit-tiny", "--dataset", "digits", "--max-steps", "20",
                  "--decide-every", "4", "--agent", "paper"],
    "gpt2-static": ["ablate", "--variant", "static-cycle", "--backbone", "gpt2", "--preset", "gpt2-tiny",
                    "--independent", "2", "--max-steps", "20"],
}


def logged(db: Path, run_id: str) -> dict:
    """What a run logged that its seed fixes: every table but timings and process memory."""
    skip = ", ".join(f"'{m}'" for m in _MACHINE_METRICS)
    return {
        "ties": _rows(db, "SELECT decision, step, state, action, independent_layers, distinct_block_weights, "
                      "changed_blocks FROM ties WHERE run_id = ? ORDER BY decision", run_id),
        "decisions": _rows(db, "SELECT decision, step, epsilon, explored, reward, q_predicted, q_target, td_loss, "
                           "greedy_agreement, q_spread, ppl FROM decisions WHERE run_id = ? ORDER BY decision",
                           run_id),
        "metrics": _rows(db, f"SELECT step, split, name, value FROM metrics WHERE run_id = ? AND name NOT IN "
                         f"({skip}) ORDER BY step, split, name", run_id),
        "memory": _rows(db, "SELECT step, param_bytes, grad_bytes, optimizer_bytes, trainable_params FROM memory "
                        "WHERE run_id = ? ORDER BY step", run_id),
    }


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _same(got, want, where: str) -> None:
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert isinstance(got, (int, float)), f"{where}: {got!r} != {want!r}"
        if math.isnan(want):
            assert math.isnan(got), f"{where}: {got!r} != nan"
        else:
            assert got == pytest.approx(want, rel=1e-4, abs=1e-9), f"{where}: {got!r} != {want!r}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_fixed_seed_run_reproduces_its_record(case, runner, tmp_path):
    db = tmp_path / "r.duckdb"
    result = invoke(runner, *CASES[case], "--db", db, "--out", tmp_path / "runs", "--quiet", "--seed", "3")
    assert result.exit_code == 0, result.stderr or result.output
    (run_id,) = _rows(db, "SELECT run_id FROM runs")[0]
    got = {table: [_plain(list(row)) for row in rows] for table, rows in logged(db, run_id).items()}
    record = RECORDS / f"{case}.json"
    if WRITE:
        RECORDS.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(got, indent=None, separators=(",", ":")) + "\n")
        pytest.skip(f"recorded {record.name}")
    want = json.loads(record.read_text())
    assert set(got) == set(want)
    for table in want:
        assert len(got[table]) == len(want[table]), f"{case}: {table} has {len(got[table])} rows, " \
                                                    f"the record {len(want[table])}"
        _same(got[table], want[table], f"{case}.{table}")
