"""Worker for tests/test_ddp.py: trains a small stream, run under torchrun or as a single process.

Usage: python ddp_worker.py OUT_DIR NUM_TASKS [resume]
Every rank writes its owner tensor and accuracy matrix to OUT_DIR/rank<r>.safetensors / rank<r>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import anpyc
from anpyc.adapters.data import synthetic_stream
from anpyc.configure import method_config
from anpyc.dist import context

torch.set_num_threads(1)
out, num_tasks = Path(sys.argv[1]), int(sys.argv[2])
resume = len(sys.argv) > 3 and sys.argv[3] == "resume"
ctx = context("cpu")
stream = synthetic_stream(num_tasks=3, samples_per_class=40, vector=True, dim=32, seed=3).take(num_tasks)
cfg = method_config("anpyc", **{
    "optim.epochs": 2, "optim.batch_size": 24, "optim.lr": 0.05, "importance.max_batches": 4,
    "importance.batch_size": 20, "prune.mode": "guarded", "prune.step": 0.3, "prune.min_step": 0.1,
    "prune.tolerance": 0.1, "prune.retrain_epochs": 1,
})
run = out / "run"
if resume:
    learner = anpyc.ContinualLearner.resume(run)
else:
    learner = anpyc.ContinualLearner("mlp", input_spec=stream.input_spec, out_dir=run, config=cfg,
                                     model_kwargs={"hidden": [24, 16]})
m = learner.fit(stream)
save_file({"owners": learner.space.owners}, str(out / f"rank{ctx.rank}.safetensors"))
(out / f"rank{ctx.rank}.json").write_text(json.dumps({"world": ctx.world_size, "acc": m["accuracy_matrix"],
                                                       "capacity": m["capacity"]}))
