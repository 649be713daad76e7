"""torchrun (gloo, 2 CPU processes): same masks on every rank and as one process; resume under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

WORKER = str(Path(__file__).with_name("ddp_worker.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _single(out: Path, tasks: int, *extra: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, WORKER, str(out), str(tasks), *extra], env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def _torchrun(out: Path, tasks: int, *extra: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "0",
           "--standalone", WORKER, str(out), str(tasks), *extra]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])


def _result(out: Path, rank: int):
    return load_file(str(out / f"rank{rank}.safetensors"))["owners"], json.loads((out / f"rank{rank}.json").read_text())


@pytest.mark.slow
def test_torchrun_matches_single_process_and_resumes(tmp_path):
    _single(tmp_path / "single", 3)
    _torchrun(tmp_path / "ddp", 3)
    owners1, single = _result(tmp_path / "single", 0)
    owners_r0, r0 = _result(tmp_path / "ddp", 0)
    owners_r1, r1 = _result(tmp_path / "ddp", 1)
    assert r0["world"] == 2 and r1["world"] == 2 and single["world"] == 1
    assert (owners_r0 == owners_r1).all(), "ranks took different pruning decisions"
    assert (owners_r0 == owners1).all(), "2 processes pruned differently from 1 process with the same global batch"
    assert (owners1 != 255).sum() < owners1.numel(), "pruning must have released units"
    # accuracy matrices: same decisions, same data order; float summation order may differ slightly
    for a, b in zip(single["acc"], r0["acc"]):
        for x, y in zip(a, b):
            assert abs(x - y) <= 0.05, (single["acc"], r0["acc"])
    assert r0["acc"] == r1["acc"]
    # only rank 0 wrote the run directory, atomically (one committed generation, no temp files)
    state = tmp_path / "ddp" / "run" / "state"
    assert [p.name for p in state.iterdir()] == [json.loads((tmp_path / "ddp" / "run" / "run.json").read_text())
                                                 ["generation"].__format__("06d")]
    # resume under torchrun: two tasks, then the full stream again
    _torchrun(tmp_path / "resumed", 2)
    _torchrun(tmp_path / "resumed", 3, "resume")
    owners_res, res = _result(tmp_path / "resumed", 0)
    assert (owners_res == owners_r0).all()
    assert res["acc"] == r0["acc"]
