"""Shared helpers for the test suite: tiny streams and fast learner configurations."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(int(os.environ.get("ANPYC_TEST_THREADS", "2")))

# model name -> kwargs for the synthetic stream (32x32 images, or vectors for the MLP)
MODELS = {
    "test_resnet": {},
    "test_vit": {},
    "test_convnext": {},
    "test_efficientnet": {},
    "mlp": {"vector": True, "dim": 48},
    "cnn": {},
}


def tiny_stream(model: str, num_tasks: int = 3, samples_per_class: int = 12, seed: int = 0):
    from anpyc.adapters.data import synthetic_stream

    return synthetic_stream(num_tasks=num_tasks, samples_per_class=samples_per_class, img_size=32, seed=seed,
                            **MODELS.get(model, {}))


def fast_config(method: str = "anpyc", **overrides):
    """Schedule pruning (half of each task's claim in one step) so every task owns a real subset, one epoch."""
    from anpyc.config import method_config

    base = {
        "optim.epochs": 1, "optim.batch_size": 16, "optim.lr": 0.02,
        "importance.max_batches": 2, "importance.batch_size": 16,
        "prune.mode": "schedule", "prune.first_ratio": 0.5, "prune.step": 0.5, "prune.decay": 1.0,
        "prune.retrain_epochs": 1, "eval_batch_size": 64,
    }
    base.update(overrides)
    return method_config(method, **base)


@pytest.fixture
def randomized_norms():
    from anpyc.structure import randomize_norms

    def apply(module, seed=0):
        with torch.no_grad():
            randomize_norms(module, torch.Generator().manual_seed(seed))
        return module

    return apply
