"""Starting from trained weights: growth keeps every earlier task exact (its slice, its masked model, its accuracy),
from a weights file and from timm's pretrained loader (an offline Hugging Face cache); the run-time invariant stops a
run whose operation changes an earlier task, before anything is saved, and reports drift for the methods that share
weights; a task is measured with statistics of its final weights; ``--pretrained`` offline answers at once."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from safetensors.torch import save_file

import anpyc
import anpyc.weights
from anpyc.adapters.data import synthetic_stream
from anpyc.errors import InvariantViolation, clip
from anpyc.learner import Callback
from anpyc.structure.walk import close

from conftest import MODELS
from test_bad_inputs import FAST, SYNTH, intact, invoke, snapshot, user_error

GROW = {"optim.epochs": 2, "optim.batch_size": 16, "optim.lr": 0.02, "importance.max_batches": 2,
        "importance.batch_size": 16, "prune.horizon": 2, "grow.min_free": 0.5, "grow.step": 0.25,
        "eval_batch_size": 64, "threads": 2}


def trained_like(name: str, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    """A state dict with what training leaves in a network: weights moved away from their init and BatchNorm
    statistics spread as a trained layer's are (variances of mean ~ spread: a normal drawn around them is negative for
    about one channel in six)."""
    g = torch.Generator().manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("running_var"):
            out[k] = -torch.log(torch.rand(v.shape, generator=g))  # exponential(1)
        elif k.endswith("running_mean"):
            out[k] = torch.randn(v.shape, generator=g)
        elif v.is_floating_point():
            out[k] = v + 0.1 * torch.randn(v.shape, generator=g)
        else:
            out[k] = v
    return {k: v.contiguous() for k, v in out.items()}


def _stream(model: str, num_tasks: int = 4):
    return synthetic_stream(num_tasks=num_tasks, samples_per_class=12, img_size=32, seed=0, **MODELS.get(model, {}))


def _learner(model, stream, weights, **overrides):
    return anpyc.ContinualLearner(model, input_spec=stream.input_spec, weights=weights,
                                  config=anpyc.method_config("anpyc", **{**GROW, **overrides}))


def _learn_and_check(learner, stream) -> None:
    """Learn ``stream``; after every task, every earlier task's slice is bit-identical, its masked model finite and
    within parity of it, and its accuracy what it was when it ended."""
    x = torch.randn(3, *stream.input_spec.shape, generator=torch.Generator().manual_seed(1))
    seen: dict[int, torch.Tensor] = {}
    for i, task in enumerate(stream):
        learner.learn(task, final=i == len(stream) - 1)
        for t in learner.task_ids():
            with torch.no_grad():
                y = learner.subnetwork(t)(x)
            masked = learner.reference_forward(t, x).cpu()
            ok, diff = close(y, masked)
            assert ok, f"task {t}'s masked model is off its slice by {diff} after task {task.id}"
            if t in seen:
                assert torch.equal(y, seen[t]), f"task {t} changed after task {task.id}"
            seen[t] = y
    assert learner.state.growth, "no growth happened"
    rows = learner.state.acc_test
    assert all(rows[-1][j] == rows[j][j] for j in range(len(rows))), rows
    assert learner.metrics()["bwt"] == 0.0


@pytest.mark.parametrize("model", ["test_resnet", "test_convnext", "test_vit"])
def test_growth_from_trained_weights_keeps_every_earlier_task(model, tmp_path):
    stream = _stream(model)
    kwargs = {"img_size": 32} if model == "test_vit" else {}
    save_file(trained_like(model, **kwargs), tmp_path / "w.safetensors")
    learner = _learner(model, stream, tmp_path / "w.safetensors")
    if model == "test_resnet":  # the statistics loaded are a trained network's, not a fresh BatchNorm's
        assert float(min(v.min() for k, v in learner.state.init.stats.items() if k.endswith("running_var"))) < 0.05
    _learn_and_check(learner, stream)
    for stats in learner.state.stats.values():  # no task holds a negative variance for any channel
        assert all(float(v.min()) >= 0 for k, v in stats.items() if k.endswith("running_var"))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding test_resnet's weights (timm's repo layout), the network down."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    state = trained_like("test_resnet", seed=3)
    save_file({**state, "fc.weight": torch.zeros(1000, 32), "fc.bias": torch.zeros(1000)}, snap / "model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(anpyc.weights, "reachable", lambda *a, **k: False)
    return state


def test_growth_from_timm_pretrained_weights_offline(hf_cache):
    """The pretrained loader's path: timm reads the weights from the hub's cache with the network down (no retries:
    the hub is asked nothing), and growth from them keeps every earlier task."""
    stream = _stream("test_resnet")
    learner = _learner("test_resnet", stream, "pretrained")
    assert torch.equal(learner.state.init.stats["bn1.running_var"].cpu(), hf_cache["bn1.running_var"])
    assert learner.backbone["weights"]["hub_id"] == "timm/test_resnet.r160_in1k"
    _learn_and_check(learner, stream)


def test_pretrained_offline_without_a_cache_fails_at_once(monkeypatch, tmp_path):
    from huggingface_hub import constants

    calls = []
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(anpyc.weights, "reachable", lambda *a, **k: calls.append(a) or False)
    real = timm.create_model
    made = []
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: made.append(kw) or real(name, **kw))
    out = tmp_path / "run"
    line = user_error(invoke("train", "--model", "test_resnet", "--pretrained", *SYNTH, "--out", out, *FAST),
                      "cannot load the pretrained weights of 'test_resnet': huggingface.co cannot be reached",
                      "not in the local cache", "--weights FILE")
    assert line.endswith("run once online to fill the cache)"), line  # the whole line, not cut mid-word
    assert calls and not any(kw.get("pretrained") for kw in made)  # the hub was never asked (no minute of retries)
    assert not out.exists()


def test_reachable_is_false_for_a_closed_port():
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert anpyc.weights.reachable("127.0.0.1", port, timeout=2.0) is False
    assert anpyc.weights.reachable("no-such-host.invalid", 443, timeout=2.0) is False


def test_clip_never_cuts_a_word():
    text = "try again " * 40
    out = clip(text, 50)
    assert len(out) <= 50 and out.endswith("...") and out[:-3].split()[-1] in ("try", "again")
    assert clip("short  text\nwith lines", 50) == "short text with lines"
    assert clip("x" * 80, 20) == "x" * 17 + "..."  # one word longer than the limit: cut, and the "..." says so


def test_no_library_code_cuts_error_text_with_a_slice():
    """Texts are shortened by ``clip`` (at a word boundary), never by ``text[:n]`` (mid-word: "try aga")."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = []
    for folder in ("anpyc_core", "adapters", "export", "apps", "cli"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice)
                        and node.slice.lower is None and isinstance(node.slice.upper, ast.Constant)
                        and isinstance(node.slice.upper.value, int) and node.slice.upper.value >= 20):
                    continue
                v = node.value
                texty = isinstance(v, ast.JoinedStr) or (isinstance(v, ast.Call) and (
                    (isinstance(v.func, ast.Name) and v.func.id in ("str", "repr"))
                    or (isinstance(v.func, ast.Attribute) and v.func.attr in ("join", "strip", "format"))))
                if texty:
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, found


# ------------------------------------------------------------------------------------------------ run-time invariant

def _bad_growth(monkeypatch):
    """Growth as it was: a new channel's running variance drawn around the trained layer's (negative for some)."""
    import anpyc.structure.widening as sg

    monkeypatch.setattr(sg, "_statistic_reset", lambda module, attr: -1.0 if attr == "running_var" else None)


def test_a_growth_that_breaks_an_earlier_task_stops_the_run_before_saving(monkeypatch, tmp_path):
    stream = _stream("test_resnet", 3)
    save_file(trained_like("test_resnet"), tmp_path / "w.safetensors")
    run = tmp_path / "run"
    learner = anpyc.ContinualLearner("test_resnet", input_spec=stream.input_spec, weights=tmp_path / "w.safetensors",
                                     out_dir=run, config=anpyc.method_config("anpyc", **{**GROW, "grow.min_free": 1.0}))
    learner.learn(stream[0])
    before = snapshot(run / "state", run / "run.json")
    _bad_growth(monkeypatch)
    with pytest.raises(InvariantViolation) as e:
        learner.learn(stream[1])
    line = e.value.one_line
    assert line.startswith("task 0's masked model left its subnetwork during the growth of "), line
    assert "at the start of task 1" in line and "(max abs diff nan)" in line and "last good generation" in line
    intact(before)  # nothing was committed: the run reopens at task 0
    learner.close()
    assert anpyc.ContinualLearner.load(run).task_ids() == [0]


def test_the_cli_exits_non_zero_with_one_line_and_keeps_the_last_generation(monkeypatch, tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file(trained_like("test_resnet"), weights)
    grow = ["--set", "grow.min_free=1.0", "--set", "prune.mode=gradual"]  # every group grows at the next task
    run = tmp_path / "run"
    _bad_growth(monkeypatch)
    user_error(invoke("train", "--model", "test_resnet", "--weights", weights, *SYNTH, "--tasks", "2", "--out", run,
                      *FAST, *grow), "task 0's masked model left its subnetwork during the growth", "report it")
    learner = anpyc.ContinualLearner.load(run)  # the generation task 0 committed, whole
    assert learner.task_ids() == [0] and not learner.state.growth
    assert json.loads((run / "metrics.json").read_text())["num_tasks"] == 1


def test_a_reinit_that_touches_an_earlier_task_is_named(monkeypatch, tmp_path):
    stream = _stream("test_resnet", 2)
    learner = _learner("test_resnet", stream, None, **{"grow.enabled": False})
    learner.learn(stream[0])
    owned = learner.space.owners == 0
    # a broken re-initialisation: the init values of every unit task 0 owns are written as the next task claims
    real = learner.space.claim_free

    def claim(k):
        out = real(k)
        return out | owned

    monkeypatch.setattr(learner.space, "claim_free", claim)
    learner.state.init.params = {n: p + 1.0 for n, p in learner.state.init.params.items()}
    with pytest.raises(InvariantViolation) as e:
        learner.learn(stream[1], final=True)
    assert e.value.one_line.startswith("task 0 changed during the re-initialisation of the units task 1 claimed: its "
                                       "subnetwork's outputs on the probe batch moved by ")


def test_shared_weight_methods_report_their_drift(tmp_path):
    stream = _stream("test_resnet", 3)
    learner = anpyc.ContinualLearner("test_resnet", input_spec=stream.input_spec, out_dir=tmp_path / "run",
                                     config=anpyc.method_config("finetune", **{**GROW, "optim.lr": 0.05}))
    learner.fit(stream)
    drift = [h["drift"] for h in learner.state.history]
    assert drift[0] == {} and set(drift[1]) == {"0"} and set(drift[2]) == {"0", "1"}
    assert all(v > 0 and math.isfinite(v) for d in drift[1:] for v in d.values()), drift  # fine-tuning moves them
    ends = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()
            if '"task_end"' in line]
    assert [e["drift"] for e in ends] == drift
    # the records survive a reopen, and a hard-freeze run reports exactly zero
    reopened = anpyc.ContinualLearner.load(tmp_path / "run")
    assert set(reopened.state.probes.outputs) == {0, 1, 2}
    assert torch.equal(reopened.state.probes.inputs, learner.state.probes.inputs)
    hard = _learner("test_resnet", stream, None)
    hard.fit(stream)
    assert all(v == 0.0 for h in hard.state.history for v in h["drift"].values()) and hard.state.history[-1]["drift"]


def test_a_task_is_measured_with_statistics_of_its_final_weights(tmp_path):
    """BatchNorm running averages that lag the weights (here: they barely move) make a task that learned look at
    chance; the reference a strategy's guard uses and the accuracy reported are measured with re-estimated ones."""
    stream = _stream("test_resnet", 1)
    learner = _learner("test_resnet", stream, None, **{"optim.epochs": 3, "grow.enabled": False})
    for m in learner.trunk.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1e-4
    events = []

    class Keep(Callback):
        def on_event(self, event):
            events.append(event.to_dict())

    learner.callbacks.append(Keep())
    learner.learn(stream[0], final=True)
    a0 = next(e["val_acc"] for e in events if e["event"] == "eval" and e.get("phase") == "train_end")
    assert a0 >= 0.75 and learner.state.acc_val[0][0] == a0, (a0, learner.state.acc_val)


def test_the_digest_sees_one_ulp_on_a_frozen_weight():
    """One frozen entry moved by the smallest float step changes no output the probe could show (not even the sliced
    model's, here); the digest of the finished tasks' weights sees it."""
    stream = _stream("mlp", 2)
    learner = anpyc.ContinualLearner("mlp", input_spec=stream.input_spec, model_kwargs={"hidden": [16, 16]},
                                     config=anpyc.method_config("anpyc", **GROW))
    learner.learn(stream[0])
    learner.learn(stream[1], final=True)
    assert learner.state.probes.digest_index == 1
    assert learner._check_earlier("a test") == {0: 0.0, 1: 0.0}
    owned = learner.space.tensor_masks(learner.space.active(0))
    name, p = next((n, p) for n, p in learner.trunk.named_parameters() if n in owned)
    where = tuple(int(i) for i in owned[name].expand(p.shape).nonzero()[0])
    with torch.no_grad():
        p[where] = torch.nextafter(p[where], torch.tensor(float("inf")))
    with pytest.raises(InvariantViolation) as e:
        learner._check_earlier("a test")
    assert e.value.one_line.startswith("the weights, heads or statistics of tasks 0..1 changed during a test, under "
                                       "a method that freezes them; the run stopped before saving")
