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
    from anpyc.configure import method_config

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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """An `anpyc serve` subprocess on a free loopback port; its log goes to a file (a pipe would fill up)."""

    def __init__(self, export_dir, *args: str, env: dict | None = None, timeout: float = 60):
        import subprocess
        import sys
        import tempfile
        import time

        import httpx

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "anpyc.cli", "serve", str(export_dir), "--host", "127.0.0.1", "--port",
               str(self.port), "--threads", "1", *args]
        full_env = {k: v for k, v in os.environ.items() if k != "ANPYC_SERVE_TOKEN"}
        full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"server did not answer /health within {timeout:.0f} s: {self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self) -> str:
        """Stop the server; returns its log."""
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.log()


def png_bytes(w: int = 40, h: int = 30, seed: int = 0) -> bytes:
    """A random RGB image of ``w`` x ``h`` pixels, encoded as PNG."""
    import io

    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ a small run
# A two-task run of a tiny CNN on 16 x 16 synthetic images and its export, trained once per test module that asks
# (the bad-input and hardening suites damage copies of it)

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from test_bad_inputs import FAST, SYNTH, invoke

    run = tmp_path_factory.mktemp("bad") / "run"
    r = invoke("train", "--model", "cnn", "--model-opt", "width=4", *SYNTH, "--tasks", "2", "--out", run, *FAST)
    assert r.exit_code == 0, r.output
    return run


@pytest.fixture
def run_copy(run_dir, tmp_path):
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    (dst / "run.lock").unlink(missing_ok=True)
    return dst


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory):
    from test_bad_inputs import invoke

    out = tmp_path_factory.mktemp("exp") / "export"
    r = invoke("export", run_dir, "--out", out)
    assert r.exit_code == 0, r.output
    return out
