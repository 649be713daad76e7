"""Parallel loading, mixed precision and channels-last: the worker path builds the batches the training process
builds, a killed run with workers resumes to the uninterrupted result, bf16/fp16 keep earlier tasks bit-identical,
channels-last computes what the default layout computes, and loader failures are one-line errors."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

import anpyc
from anpyc.config import LearnerConfig
from anpyc.configure import method_config
from anpyc.errors import ConfigError, DataError
from anpyc.fileio import read_jsonl
from anpyc.loading import Loaders, in_memory
from anpyc.training import make_loader

from conftest import fast_config, tiny_stream
from test_crash_safety import kill_and_resume, reference_run

CPU = torch.device("cpu")


def make_images(root: Path, *, tasks: int = 2, per_class: int = 12, size: int = 16) -> Path:
    """root/task<t>/train/<class>/*.jpg: per class a mean colour plus noise (learnable), JPEG (decoded per item)."""
    rng = np.random.default_rng(0)
    for t in range(tasks):
        for c, value in enumerate((60 + 40 * t, 190 - 30 * t)):
            d = root / f"task{t}" / "train" / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = np.clip(rng.normal(value, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.jpg", quality=90)
    return root


def folder(root: Path, **kw):
    from anpyc.adapters.data import folder_stream

    return folder_stream(root, img_size=16, cache=False, augment=True, seed=0, **kw)


def _batches(loaders: Loaders, plan) -> list:
    return [(b[0].clone(), b[1].clone(), w) for b, w in loaders.feed(plan)]


def test_worker_path_yields_the_batches_of_the_training_process(tmp_path):
    task = folder(make_images(tmp_path / "img", tasks=1))[0]
    assert not in_memory(task.train) and in_memory(tiny_stream("cnn")[0].train)
    inproc, pool = Loaders(0, CPU), Loaders(2, CPU)
    try:
        for seed in (3, 4):  # two epochs through the same persistent pool
            plan = make_loader(task.train, 5, shuffle=True, seed=seed)
            a, b = _batches(inproc, plan), _batches(pool, plan)
            assert len(a) == len(b) == len(plan) >= 3
            for (xa, ya, wa), (xb, yb, wb) in zip(a, b):
                assert torch.equal(xa, xb) and torch.equal(ya, yb) and wa == wb
            assert pool.feed(plan).loader is not None and inproc.feed(plan).loader is None
        # augmentation really draws per batch: another epoch seed gives other pixels for the same images
        again = _batches(inproc, make_loader(task.train, 5, shuffle=False, seed=5))
        other = _batches(inproc, make_loader(task.train, 5, shuffle=False, seed=6))
        assert not torch.equal(again[0][0], other[0][0])
        # a torchrun shard (rank 1 of 2) is the same through the workers
        ctx = type("Ctx", (), {"enabled": True, "rank": 1, "world_size": 2})()
        shard = make_loader(task.train, 6, shuffle=True, seed=7, ctx=ctx)
        for (xa, _, wa), (xb, _, wb) in zip(_batches(inproc, shard), _batches(pool, shard)):
            assert torch.equal(xa, xb) and wa == wb
    finally:
        pool.close()


def _learn(root: Path, out: Path, **cfg) -> anpyc.ContinualLearner:
    stream = folder(root)
    learner = anpyc.ContinualLearner("cnn", input_spec=stream.input_spec, out_dir=out, model_kwargs={"width": 8},
                                     config=fast_config(**{"optim.batch_size": 8, "importance.batch_size": 8, **cfg}))
    learner.fit(stream)
    learner.close()
    return learner


def test_workers_reach_the_in_process_result_and_record_the_data_wait(tmp_path):
    root = make_images(tmp_path / "img")
    a = _learn(root, tmp_path / "w0", workers=0)
    b = _learn(root, tmp_path / "w2", workers=2)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("w0", "w2"))
    assert ma["accuracy_matrix"] == mb["accuracy_matrix"] and ma["capacity"] == mb["capacity"]
    assert max(v for row in ma["accuracy_matrix"] for v in row if v is not None) > 0.5
    assert [a.mask_digest(t) for t in (0, 1)] == [b.mask_digest(t) for t in (0, 1)]
    assert b.loaders.workers == 2 and not b.loaders._pools  # close() stopped the pools
    for run in ("w0", "w2"):
        epochs = [e for e in read_jsonl(tmp_path / run / "events.jsonl") if e["event"] == "epoch"]
        assert {e["phase"] for e in epochs} == {"train", "retrain"}
        for e in epochs:
            assert 0 < e["data_wait"] < e["seconds"] and 0 < e["data_wait_share"] < 1
            assert e["data_wait_share"] == pytest.approx(e["data_wait"] / e["seconds"], abs=1e-3)
        assert json.loads((tmp_path / run / "config.json").read_text())["workers"] == int(run[1])


@pytest.mark.slow
def test_sigkill_and_resume_with_workers_reaches_the_uninterrupted_result(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    t_run = reference_run(ref, "workers", "0")  # the uninterrupted result, in the training process
    kills = kill_and_resume(run, "workers", "2", kills=4, low=0.2, high=t_run / 4, seed=7)
    assert kills >= 3, kills
    a = json.loads((ref / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    assert b["accuracy_matrix"] == a["accuracy_matrix"] and b["capacity"] == a["capacity"]
    assert json.loads((run / "config.json").read_text())["workers"] == 2


def _outputs(learner, x):
    """Every learned task's fp32 reference logits and its policy (autocast) logits on ``x``."""
    out = {}
    for t in learner.task_ids():
        k = learner._index(t)
        learner.runner.use(k)
        learner.model.eval()
        with torch.no_grad():
            out[t] = (learner.reference_forward(t, x), learner.policy.wrap(lambda v: learner.model(v, k))(x))
    return out


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_keeps_earlier_tasks_bit_identical(amp):
    stream = tiny_stream("cnn", num_tasks=3, samples_per_class=24)
    learner = anpyc.ContinualLearner("cnn", input_spec=stream.input_spec, model_kwargs={"width": 8},
                                     config=fast_config(amp=amp, **{"optim.epochs": 2}))
    x = torch.stack([stream[0].train[i][0] for i in range(8)])
    seen = {}
    for task in stream:
        learner.learn(task)
        now = _outputs(learner, x)
        for t, (ref, pol) in seen.items():
            assert torch.equal(now[t][0], ref) and torch.equal(now[t][1], pol), (amp, t)
        seen.update({t: v for t, v in now.items() if t not in seen})
        # the policy really is reduced precision: its logits differ from the fp32 reference
        assert not torch.equal(now[task.id][0], now[task.id][1])
    acc = learner.metrics()["accuracy_matrix"]
    assert np.mean([acc[0][0], acc[1][1], acc[2][2]]) > 0.6, acc  # above chance (0.5)
    assert [row[0] for row in acc] == [acc[0][0]] * 3


def test_channels_last_matches_the_default_layout(randomized_norms):
    stream = tiny_stream("test_resnet", num_tasks=2)
    runs = {}
    for cl in (False, True):
        learner = anpyc.ContinualLearner("test_resnet", input_spec=stream.input_spec, config=fast_config(
            channels_last=cl, **{"prune.mode": "none"}))
        randomized_norms(learner.trunk)
        w = next(p for p in learner.trunk.parameters() if p.dim() == 4)
        assert w.is_contiguous(memory_format=torch.channels_last) == cl and w.is_contiguous() != cl
        learner.fit(stream)
        runs[cl] = learner
    x = torch.stack([stream[1].train[i][0] for i in range(8)])
    for t in (0, 1):
        a, b = runs[False].reference_forward(t, x), runs[True].reference_forward(t, x)
        assert (a - b).abs().max() < 1e-3 * max(1.0, a.abs().max()), (t, (a - b).abs().max())
    ma, mb = runs[False].metrics(), runs[True].metrics()
    flat = [[v for row in m["accuracy_matrix"] for v in row] for m in (ma, mb)]
    assert np.allclose(flat[0], flat[1], atol=0.1), flat
    with pytest.raises(ConfigError, match="channels_last needs a convolutional backbone"):
        anpyc.ContinualLearner("mlp", input_size=(48,), config=LearnerConfig(channels_last=True))


def test_config_and_cli_name_the_valid_modes():
    from anpyc.cli.commands.train import Amp
    from anpyc.precision import AMP

    assert sorted(m.value for m in Amp) == sorted(AMP.names())
    with pytest.raises(ConfigError, match="'amp' has unknown value 'fp8'.*bf16, fp16, none"):
        method_config("anpyc", amp="fp8")
    with pytest.raises(ConfigError, match="'workers'"):
        method_config("anpyc", workers=-2)


def _corrupt(root: Path) -> Path:
    bad = root / "task1" / "train" / "c0" / "3.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3])  # a valid header (the scan passes), a truncated body
    return bad


def test_a_file_that_fails_to_decode_in_a_worker_is_the_in_process_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from anpyc.cli.app import app

    root = make_images(tmp_path / "img")
    bad = _corrupt(root)
    messages = []
    for workers in (0, 2):
        with pytest.raises(DataError) as e:
            _learn(root, tmp_path / f"w{workers}", workers=workers)
        messages.append(e.value.one_line)
    assert messages[0] == messages[1] and str(bad) in messages[0] and "not a readable image" in messages[0]
    r = CliRunner(env={"COLUMNS": "300"}).invoke(app, [
        "train", "--model", "cnn", "--data", str(root), "--img-size", "16", "--out", str(tmp_path / "cli"),
        "--workers", "2", "--data-opt", "cache=false", "--epochs", "1", "--no-plots", "--no-progress"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not a readable image" in lines[0] and "Traceback" not in r.output, r.output


class _Dies(Dataset):
    """Kills the worker process that builds item 5."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        if i == 5 and get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(3), 0


def test_a_dying_worker_is_a_one_line_error_not_a_hang():
    pool = Loaders(2, CPU)
    t0 = time.monotonic()
    with pytest.raises(DataError, match="a data-loading worker process died") as e:
        list(pool.feed(make_loader(_Dies(), 4, shuffle=False, seed=0)))
    assert "\n" not in e.value.one_line and time.monotonic() - t0 < 60 and not pool._pools
    pool.close()



def test_cli_records_amp_and_channels_last_and_keeps_them_on_resume(tmp_path):
    from typer.testing import CliRunner

    from anpyc.cli.app import app

    run = tmp_path / "run"
    fast = ["--epochs", "1", "--batch-size", "32", "--set", "importance.max_batches=1", "--set", "prune.mode=none",
            "--no-plots", "--no-progress"]
    invoke = CliRunner(env={"COLUMNS": "200"}).invoke
    r = invoke(app, ["train", "--model", "cnn", "--model-opt", "width=4", "--data", "digits-split", "--img-size", "16",
                     "--tasks", "1", "--out", str(run), "--amp", "bf16", "--channels-last", "--workers", "0", *fast])
    assert r.exit_code == 0, r.output
    cfg = json.loads((run / "run.json").read_text())["config"]
    assert (cfg["amp"], cfg["channels_last"], cfg["workers"]) == ("bf16", True, 0)
    r = invoke(app, ["train", "--out", str(run), "--resume", "--amp", "fp16"])
    assert r.exit_code == 2 and "--amp" in r.output and "keeps the configuration" in " ".join(r.output.split())
    r = invoke(app, ["train", "--out", str(run), "--resume", "--workers", "1", "--tasks", "2", "--no-plots",
                     "--no-progress"])  # the worker count is this process's own
    assert r.exit_code == 0, r.output
    assert json.loads((run / "run.json").read_text())["config"]["amp"] == "bf16"
