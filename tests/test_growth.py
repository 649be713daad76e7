"""Growth: a group widened when free units run out keeps every earlier task exact (its subnetwork computes
bit-identically, its export is unchanged), a grown run resumes after SIGKILL and exports with parity, and a run
past 254 tasks widens its owner dtype and round-trips its mask file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import anpyc
from anpyc.adapters.data import synthetic_stream
from anpyc.structure.widening import growable

from conftest import MODELS
from test_bad_inputs import FAST, invoke
from test_crash_safety import kill_and_resume, reference_run

GROW = {"optim.epochs": 2, "optim.batch_size": 16, "optim.lr": 0.02, "importance.max_batches": 2,
        "importance.batch_size": 16, "prune.mode": "gradual", "prune.horizon": 2, "grow.min_free": 0.5,
        "grow.step": 0.25, "eval_batch_size": 64}


def _stream(model: str, num_tasks: int = 4):
    return synthetic_stream(num_tasks=num_tasks, samples_per_class=12, img_size=32, seed=0, **MODELS.get(model, {}))


def _learner(model: str, stream, out_dir=None, **overrides):
    kwargs = {"hidden": [16, 16]} if model == "mlp" else {}
    return anpyc.ContinualLearner(model, input_spec=stream.input_spec, out_dir=out_dir, model_kwargs=kwargs,
                                  config=anpyc.method_config("anpyc", **{**GROW, "threads": 2, **overrides}))


@pytest.mark.parametrize("model", ["mlp", "test_resnet", "test_vit", "test_convnext"])
def test_growth_keeps_every_earlier_task_bit_identical(model, tmp_path, randomized_norms):
    stream = _stream(model)
    learner = _learner(model, stream)
    randomized_norms(learner.trunk)
    learner.state.init.params = {n: p.detach().clone() for n, p in learner.trunk.named_parameters()}
    x = torch.randn(3, *stream.input_spec.shape, generator=torch.Generator().manual_seed(1))
    seen: dict[int, torch.Tensor] = {}
    widths = [learner.space.num_units]
    for i, task in enumerate(stream):
        learner.learn(task, final=i == len(stream) - 1)
        widths.append(learner.space.num_units)
        for t in learner.task_ids():
            with torch.no_grad():
                y = learner.subnetwork(t)(x)
            if t in seen:
                assert torch.equal(y, seen[t]), f"task {t} changed after task {task.id}"
            seen[t] = y
            assert float((learner.reference_forward(t, x) - y).abs().max()) <= 1e-4
    assert widths[-1] > widths[0], widths  # the backbone did grow
    grown = {e.group for e in learner.state.growth}
    assert grown and all(learner.structure.groups[[g.name for g in learner.structure.groups].index(n)].size
                         > learner.space.base_sizes[n] for n in grown)
    assert all(e.index >= 1 for e in learner.state.growth)  # task 0 found a full pool
    if model == "test_vit":  # heads: the attention modules count the new heads
        heads = [e for e in learner.state.growth if e.group.endswith("attn.qkv")]
        assert heads
        attn = learner.trunk.get_submodule(heads[0].group.rsplit(".", 1)[0])
        assert attn.num_heads == next(g.size for g in learner.structure.groups if g.name == heads[0].group)


def test_grown_task_models_export_unchanged_and_resume(tmp_path):
    from anpyc.export.exporter import export_all
    from anpyc.export.runtime import load_export

    stream = _stream("test_resnet", num_tasks=3)
    learner = _learner("test_resnet", stream, out_dir=tmp_path / "run")
    learner.learn(stream[0])
    export_all(learner, tmp_path / "before", threads=1)
    learner.learn(stream[1])
    learner.learn(stream[2], final=True)
    assert learner.state.growth, "no growth happened"
    learner.close()
    reopened = anpyc.ContinualLearner.load(tmp_path / "run")
    assert [e.to_dict() for e in reopened.state.growth] == [e.to_dict() for e in learner.state.growth]
    assert reopened.space.num_units == learner.space.num_units
    export_all(reopened, tmp_path / "after", threads=1)
    x = np.random.default_rng(0).standard_normal((2, *stream.input_spec.shape)).astype(np.float32)
    before, after = load_export(tmp_path / "before"), load_export(tmp_path / "after")
    assert np.array_equal(before.logits(0, x), after.logits(0, x))  # task 0's export is unchanged by growth
    assert before.sidecar(0)["params"] == after.sidecar(0)["params"]
    for t in reopened.task_ids():
        assert after.sidecar(t)["parity"]["max_abs_diff"] <= 1e-4
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["version"] == 3 and len(manifest["growth"]) == len(learner.state.growth)
    assert sum(g["size"] for g in manifest["layout"]) < learner.space.num_units  # the layout before growth


def test_inspect_shows_widths_and_growth(tmp_path):
    stream = _stream("mlp", num_tasks=4)
    learner = _learner("mlp", stream, out_dir=tmp_path / "run")
    learner.fit(stream)
    learner.close()
    r = invoke("inspect", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [e["group"] for e in doc["growth"]] == [e.group for e in learner.state.growth]
    assert {g["name"]: (g["base_size"], g["size"]) for g in doc["groups"]} == {
        g.name: (learner.space.base_sizes[g.name], g.size) for g in learner.structure.groups}
    text = " ".join(invoke("inspect", tmp_path / "run").stdout.split())
    assert f"growth: {len(learner.state.growth)} widening(s)" in text


def test_no_grow_keeps_the_size_fixed(tmp_path):
    r = invoke("train", "--model", "mlp", "--model-opt", "hidden=[8]", "--data", "synthetic", "--data-opt",
               "vector=true", "--data-opt", "dim=16", "--data-opt", "samples_per_class=8", "--tasks", "3",
               "--out", tmp_path / "run", "--set", "prune.horizon=1", "--no-grow", *FAST)
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["growth"] == [] and manifest["config"]["grow"]["enabled"] is False
    r = invoke("train", "--out", tmp_path / "run", "--resume", "--grow")
    assert r.exit_code == 2 and "--grow/--no-grow" in r.output


def test_a_group_the_rules_cannot_widen_is_never_widened():
    """Branches of a concat share the concatenated dimension: no group may widen it alone."""

    class Cat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 4), torch.nn.Linear(6, 3)
            self.c = torch.nn.Linear(7, 5)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], dim=1))

    from anpyc.structure import walk

    s = walk(Cat(), torch.randn(2, 6))
    reasons = {g.name: growable(s, g.name) for g in s.groups}
    assert reasons["c"] is None
    branch = [n for n in reasons if n != "c"]
    assert branch and all("not laid out unit by unit over its whole size" in reasons[n] for n in branch), reasons


@pytest.mark.slow
def test_grown_run_resumes_after_sigkill(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    t_run = reference_run(ref, "grow")
    kills = kill_and_resume(run, "grow", kills=6, low=0.01, high=t_run / 6, seed=7)
    assert kills >= 4, kills
    a = json.loads((ref / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    assert b["accuracy_matrix"] == a["accuracy_matrix"] and b["num_units"] == a["num_units"] > 32
    assert json.loads((run / "run.json").read_text())["growth"] == json.loads((ref / "run.json").read_text())["growth"]
    from anpyc.export.exporter import export_all

    learner = anpyc.ContinualLearner.load(run)
    for s in export_all(learner, tmp_path / "export", threads=1):
        assert s["parity"]["max_abs_diff"] <= 1e-4


@pytest.mark.slow
def test_a_run_past_254_tasks_widens_its_owners(tmp_path):
    """260 tiny tasks: owners switch from uint8 to int16 at task 254, and the mask file round-trips."""
    from anpyc.masks import load_masks, save_masks
    from anpyc.task import Task

    g = torch.Generator().manual_seed(0)

    def data():
        x = torch.randn(8, 6, generator=g)
        return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())

    cfg = anpyc.method_config("anpyc", **{"optim.epochs": 1, "optim.batch_size": 8, "prune.mode": "none",
                                          "importance.max_batches": 1, "grow.min_free": 0.25, "grow.step": 0.25,
                                          "grow.max_width": 80.0, "checkpoint_epochs": False, "threads": 1})
    learner = anpyc.ContinualLearner("mlp", input_size=(6,), config=cfg, model_kwargs={"hidden": [4]})
    for t in range(260):
        learner.learn(Task(t, f"t{t}", ("a", "b"), data()))
    owners = learner.space.owners
    assert owners.dtype == torch.int16 and int(owners.max()) == 259 and learner.space.free == 32767
    assert learner.task_ids() == list(range(260))
    save_masks(tmp_path / "masks.safetensors", learner.space, tasks=list(range(260)))
    tensors, schema = load_masks(tmp_path / "masks.safetensors", learner.space)
    assert schema["dtype"] == "int16" and schema["free"] == 32767 and schema["num_tasks"] == 260
    assert torch.equal(tensors["owners"], owners)
    x = torch.randn(2, 6)
    assert learner.subnetwork(0)(x).shape == (2, 2) and learner.subnetwork(259)(x).shape == (2, 2)


class _Ghost(torch.nn.Module):
    """GhostNet's module: a concat of two branches cut back to a stored width (a no-op when slicing, a truncation
    when widening)."""

    def __init__(self):
        super().__init__()
        self.out_chs = 8
        self.primary = torch.nn.Conv2d(6, 4, 1)
        self.cheap = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4)

    def forward(self, x):
        x1 = torch.relu(self.primary(x))
        return torch.cat([x1, self.cheap(x1)], dim=1)[:, :self.out_chs]


class _GhostNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.ghost = _Ghost()
        self.mix = torch.nn.Conv2d(8, 5, 1)

    def forward(self, x):
        x = self.mix(self.ghost(torch.relu(self.stem(x))))
        return x.mean(dim=(2, 3))


def test_a_width_the_rules_do_not_see_keeps_its_group_from_growing():
    """The tensor rules allow widening the ghost branches, but the stored width would cut the new channels off:
    the trial widening on a copy finds it, names why, and the trunk is left as it was; the other groups may grow."""
    from anpyc.structure import walk
    from anpyc.structure.widening import check_growth

    torch.manual_seed(0)
    net = _GhostNet().eval()
    x = torch.randn(2, 3, 8, 8)
    s = walk(net, x)
    ghost = next(g.name for g in s.groups if "ghost" in g.name)
    assert growable(s, ghost) is None  # the rules alone would widen it
    before = {k: v.clone() for k, v in net.state_dict().items()}
    why = check_growth(net, s, ghost, x)
    assert why is not None and why.startswith("widening breaks the forward pass (RuntimeError:"), why
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # checked on a copy
    assert check_growth(net, s, "stem", x) is None


def test_a_learner_never_widens_a_group_its_trial_widening_breaks(tmp_path):
    """A learner whose ghost group runs out of free units widens the groups that can grow and learns on."""
    stream = synthetic_stream(num_tasks=3, samples_per_class=8, img_size=8, seed=0)
    learner = anpyc.ContinualLearner(_GhostNet(), input_spec=stream.input_spec,
                                     config=anpyc.method_config("anpyc", **{**GROW, "threads": 2}))
    ghost = next(g.name for g in learner.structure.groups if "ghost" in g.name)
    for i, task in enumerate(stream):
        learner.learn(task, final=i == len(stream) - 1)
    grown = {e.group for e in learner.state.growth}
    assert ghost not in grown and grown, grown
    assert learner.growth_verdicts[ghost].startswith("widening breaks the forward pass")
    assert min(learner.state.acc_test[-1]) > 0.0


class _RelBias(torch.nn.Module):
    """timm's RelPosBias: a per-head bias table read back through a stored shape ``(area, area, heads)``, next to
    a stored area that a grown head count can come to equal."""

    def __init__(self, heads: int, area: int = 3):
        super().__init__()
        self.area = area
        self.bias_shape = (area, area, heads)
        self.table = torch.nn.Parameter(torch.randn(5, heads))
        self.register_buffer("index", torch.arange(area * area) % 5, persistent=False)

    def forward(self, attn):
        return attn + self.table[self.index].view(self.bias_shape).permute(2, 0, 1).unsqueeze(0)


class _RelAttention(torch.nn.Module):
    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.rel = _RelBias(heads)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = self.rel((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, -1))


class _RelNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(4, 8)
        self.attn = _RelAttention()

    def forward(self, x):
        x = self.embed(x)
        return (x + self.attn(x)).mean(1)


def test_a_grown_head_count_equal_to_an_unrelated_stored_size_slices_exactly():
    """Heads grown from 2 to 3 come to equal the bias module's stored area (3). Slicing the grown trunk back to 2
    heads must rewrite only where the head count was stored, not the area that now happens to be equal."""
    from anpyc.structure import walk
    from anpyc.structure.widening import grow_group
    from anpyc.structure.slicing import slice_trunk
    from anpyc.structure.walk import parity

    torch.manual_seed(0)
    net = _RelNet().eval()
    x = torch.randn(2, 3, 4)
    s = walk(net, x)
    heads = next(g for g in s.groups if g.kind.startswith("heads"))
    assert heads.size == 2 and "attn.rel.table" in {t.tensor for t in heads.slices}
    init = {n: p.detach().clone() for n, p in net.named_parameters()}
    grown, _, _ = grow_group(net, s, heads.name, 1, init=init, generator=torch.Generator().manual_seed(0))
    assert (net.attn.num_heads, net.attn.rel.area, net.attn.rel.bias_shape) == (3, 3, (3, 3, 3))
    g = next(g for g in grown.groups if g.name == heads.name)
    active = torch.ones(grown.num_units, dtype=torch.bool)
    active[g.offset + 1] = False
    sliced = slice_trunk(net, grown, active)
    assert (sliced.attn.num_heads, sliced.attn.rel.area, sliced.attn.rel.bias_shape) == (2, 3, (3, 3, 2))
    report = parity(net, grown, active, x)
    assert report.ok, report
