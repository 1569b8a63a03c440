"""`dyntie study --executor ray` on a real local Ray cluster (started by the study's driver): each cell a Ray task
with a registry of its own, merged into the study's as cells finish; the driver killed (SIGKILL) after its first
finished cell and started again finishes the study with no cell trained twice, and the table equals the local
executor's. CI runs one seed (two cells); the two-seed study is marked slow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import invoke, rows

pytest.importorskip("ray", reason="the cluster executor's test needs Ray: pip install -e '.[test]' installs it")

STUDY = ("study", "gpt2", "--preset", "gpt2-tiny", "--max-steps", "16", "--decide-every", "2", "--variants",
         "dynamic,no-tying", "--name", "tiny", "--threads", "1", "--format", "json")


def _driver(db, out, seeds: str) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}  # a local cluster of the driver's own
    return subprocess.Popen([sys.executable, "-m", "dyntie_cli", *STUDY, "--seeds", seeds, "--db", str(db), "--out",
                             str(out), "--executor", "ray"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


@pytest.mark.parametrize("seeds", ["0", pytest.param("0,1", marks=pytest.mark.slow)])
def test_a_study_on_ray_survives_its_driver_killed_and_equals_the_local_one(runner, tmp_path, seeds):
    db, out = tmp_path / "ray.duckdb", tmp_path / "runs"
    cells = [(variant, int(seed)) for variant in ("dynamic", "no-tying") for seed in seeds.split(",")]
    driver = _driver(db, out, seeds)
    deadline = time.time() + 600
    said = []
    first = f"finished (1 of {len(cells)})"
    for line in driver.stderr:  # the first cell finished and merged: the driver dies without a word
        said.append(line)
        if first in line or time.time() > deadline:
            break
    driver.send_signal(signal.SIGKILL)
    driver.communicate(timeout=60)
    assert any(first in line for line in said), "".join(said)[-3000:]
    assert rows(db, "SELECT count(*) FROM runs WHERE status = 'finished'")[0][0] >= 1

    again = _driver(db, out, seeds)
    table, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "already finished" in err
    recorded = rows(db, "SELECT variant, seed, count(*) FROM runs GROUP BY ALL ORDER BY ALL")
    assert recorded == [(variant, seed, 1) for variant, seed in sorted(cells)], "each cell once"
    assert {d.name for d in (out / "study-cells" / "tiny").iterdir()} == {f"{v}-seed{s}" for v, s in cells}

    local = invoke(runner, *STUDY, "--seeds", seeds, "--db", tmp_path / "local.duckdb", "--out", tmp_path / "local",
                   "--quiet")
    assert local.exit_code == 0, local.stderr
    on_ray, here = json.loads(table), json.loads(local.stdout)
    assert [row["variant"] for row in on_ray] == [row["variant"] for row in here]
    for a, b in zip(on_ray, here):
        for key, value in b.items():
            if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
                assert a[key] == pytest.approx(value, rel=1e-4), key
            else:
                assert a[key] == value, key


def test_an_unknown_executor_is_refused_in_one_sentence(runner, tmp_path):
    r = invoke(runner, *STUDY, "--seeds", "0", "--db", tmp_path / "s.duckdb", "--out", tmp_path / "runs", "--executor",
               "slurm")
    assert r.exit_code == 2 and "Unknown executor 'slurm'; use local or ray." in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
