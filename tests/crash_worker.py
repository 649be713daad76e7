"""Worker for tests/test_crash_safety.py (and the growth test): trains (or resumes) a small run; prints READY once
training starts.

Usage: python crash_worker.py RUN_DIR [grow | workers N]
  grow: an MLP stream whose free units run out, so it widens
  workers N: an augmented JPEG folder (next to RUN_DIR, written once) decoded per item by N loader workers
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import anpyc
from anpyc.adapters.data import synthetic_stream
from anpyc.configure import method_config

torch.set_num_threads(1)
run = Path(sys.argv[1])
stream = synthetic_stream(num_tasks=3, samples_per_class=24, img_size=16, seed=5)
cfg = method_config("anpyc", **{
    "optim.epochs": 3, "optim.batch_size": 8, "optim.lr": 0.03, "importance.max_batches": 3,
    "importance.batch_size": 8, "prune.mode": "guarded", "prune.step": 0.25, "prune.min_step": 0.1,
    "prune.tolerance": 0.3, "prune.retrain_epochs": 1,
})
model, kwargs = "cnn", {"width": 8}
if sys.argv[2:] == ["grow"]:
    stream = synthetic_stream(num_tasks=5, samples_per_class=24, vector=True, dim=32, seed=5)
    cfg = method_config("anpyc", **{
        "optim.epochs": 3, "optim.batch_size": 8, "optim.lr": 0.03, "importance.max_batches": 3,
        "importance.batch_size": 8, "prune.mode": "gradual", "prune.horizon": 2, "grow.min_free": 0.5,
        "grow.step": 0.25})
    model, kwargs = "mlp", {"hidden": [16, 16]}
if sys.argv[2:3] == ["workers"]:
    from test_loading import folder, make_images

    images = run.parent / "images"
    if not images.exists():
        make_images(images, tasks=2, per_class=12)
    stream = folder(images)
    cfg = cfg.replace(workers=int(sys.argv[3]))
    torch.set_num_threads(1)  # (importing the test module set the suite's thread count)
if (run / "run.json").exists():
    learner = anpyc.ContinualLearner.resume(run)
else:
    learner = anpyc.ContinualLearner(model, input_spec=stream.input_spec, out_dir=run, config=cfg,
                                     model_kwargs=kwargs)
print("READY", flush=True)
learner.fit(stream)
print("DONE", flush=True)
