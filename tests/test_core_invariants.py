"""The invariants of issue 2: isolation, no drift under hard freeze, removal semantics under LayerNorm."""

from __future__ import annotations

import pytest
import torch

import anpyc
from anpyc.masks import FREE

from conftest import MODELS, fast_config, tiny_stream


def _learn(model: str, config, num_tasks: int = 3, randomize=None):
    stream = tiny_stream(model, num_tasks=num_tasks)
    learner = anpyc.ContinualLearner(model, input_spec=stream.input_spec, config=config)
    if randomize is not None:
        randomize(learner.trunk)
    return learner, stream


def _inputs(stream, n: int = 6) -> torch.Tensor:
    return torch.stack([stream[0].test[i][0] for i in range(n)])


@pytest.mark.parametrize("model", list(MODELS))
def test_isolation_bit_exact(model):
    """Randomising every element that belongs only to units outside task t leaves task t bit-for-bit unchanged."""
    learner, stream = _learn(model, fast_config())
    for task in stream:
        learner.learn(task)
    x = _inputs(stream)
    owners = learner.space.owners
    assert int((owners == FREE).sum()) > 0 and int((owners == 2).sum()) > 0, "pruning must leave real subsets"
    gen = torch.Generator().manual_seed(1)
    for k, task in enumerate(stream):
        before = learner.reference_forward(task.id, x).clone()
        changed = 0
        with torch.no_grad():
            for name, p in learner.trunk.named_parameters():
                outside = learner.space.element_owner(name, tuple(p.shape)) > k
                if bool(outside.any()):
                    p[outside] = torch.randn(int(outside.sum()), generator=gen) * 3
                    changed += int(outside.sum())
            for j, head in learner.model.heads.items():
                if int(j) != k:
                    for hp in head.parameters():
                        hp.copy_(torch.randn(hp.shape, generator=gen))
            for j, stats in learner.state.stats.items():
                if j != k:
                    for v in stats.values():
                        if v.is_floating_point():
                            v.copy_(torch.rand(v.shape, generator=gen) + 0.5)
        after = learner.reference_forward(task.id, x)
        if k < len(stream) - 1:
            assert changed > 0, f"task {k}: nothing outside its mask to randomise"
        assert torch.equal(before, after), f"{model} task {k}: max diff {float((before - after).abs().max())}"


@pytest.mark.parametrize("model", ["test_resnet", "test_efficientnet", "test_vit", "mlp", "cnn"])
def test_hard_freeze_no_drift(model, randomized_norms):
    """With hard freeze, a task's outputs after later tasks equal its outputs right after it was learned."""
    learner, stream = _learn(model, fast_config("anpyc", **{"consolidation.rule": "hard", "optim.epochs": 2}),
                             randomize=randomized_norms)
    x = _inputs(stream)
    learner.learn(stream[0])
    first = learner.reference_forward(0, x).clone()
    for task in stream.tasks[1:]:
        learner.learn(task)
    later = learner.reference_forward(0, x)
    assert torch.allclose(first, later, atol=1e-6, rtol=0), float((first - later).abs().max())


def test_soft_rules_do_drift(randomized_norms):
    """The drift test can fail: fine-tuning (no protection) moves task 0's outputs."""
    learner, stream = _learn("cnn", fast_config("finetune", **{"optim.epochs": 2, "optim.lr": 0.05}),
                             randomize=randomized_norms)
    x = _inputs(stream)
    learner.learn(stream[0])
    first = learner.reference_forward(0, x).clone()
    for task in stream.tasks[1:]:
        learner.learn(task)
    assert float((first - learner.reference_forward(0, x)).abs().max()) > 1e-3


@pytest.mark.parametrize("model", ["test_vit", "test_convnext"])
def test_removal_semantics_layernorm(model, randomized_norms):
    """Masked dense output == physically sliced subnetwork (LayerNorm over kept channels only) within 1e-5."""
    learner, stream = _learn(model, fast_config(), num_tasks=2, randomize=randomized_norms)
    for task in stream:
        learner.learn(task)
    x = _inputs(stream)
    norm_checked = 0
    for task in stream:
        k = learner._index(task.id)
        active = learner.space.active(k)
        assert 0 < int(active.sum()) < learner.space.num_units
        learner.reference_forward(stream[-1 - k].id, x)  # another task's masks are active when the copy is made
        sub = learner.subnetwork(task.id)
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in sub.modules()), "masked-norm hooks leaked"
        dense_params = sum(p.numel() for p in learner.trunk.parameters())
        assert sum(p.numel() for p in sub.trunk.parameters()) < dense_params, "nothing was physically removed"
        masked = learner.reference_forward(task.id, x)
        with torch.no_grad():
            sliced = sub(x)
        assert float((masked - sliced).abs().max()) <= 1e-5
        # zeroing without the masked normalisation is NOT the same thing (the test can fail)
        if not learner.space.norm_masks(active):
            continue
        norm_checked += 1
        learner.runner.use(k)
        learner.model._norm_masks = {}
        learner.model.eval()
        with torch.no_grad():
            naive = learner.model(x, k)
        assert float((naive - sliced).abs().max()) > 1e-4
    assert norm_checked > 0, "no task removed channels under a LayerNorm"


class _Shared(torch.nn.Module):
    """One block used twice (CoaT shares its parallel blocks' MLP) and a weight tied between two layers."""

    def __init__(self):
        super().__init__()
        self.block = torch.nn.Linear(6, 6)
        self.again = self.block
        self.a = torch.nn.Linear(6, 6, bias=False)
        self.b = torch.nn.Linear(6, 6, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(self.again(torch.relu(self.block(x))))))


def test_a_masked_forward_leaves_shared_and_tied_tensors_in_place():
    """A masked forward through a module shared under two names leaves the module's own Parameter behind (torch's
    tied-weights path left the masked product in it, so growth and training later wrote to a tensor nothing used),
    and a weight tied between two layers is masked in both."""
    from anpyc.structure.masked import MaskedModel

    torch.manual_seed(0)
    net = _Shared()
    params = {n: p for n, p in net.named_parameters()}
    assert sorted(params) == ["a.weight", "block.bias", "block.weight"]
    mm = MaskedModel(net, 6)
    row = torch.ones(6, 6)
    row[2] = 0
    mm.set_masks({"block.weight": row, "a.weight": row}, {}, None)
    x = torch.randn(3, 6)
    y = mm.features(x)
    assert net.block.weight is params["block.weight"] and isinstance(net.block.weight, torch.nn.Parameter)
    assert net.b.weight is params["a.weight"]
    w, bias, t = params["block.weight"] * row, params["block.bias"], params["a.weight"] * row
    want = torch.relu((torch.relu(x @ w.T + bias) @ w.T + bias) @ t.T) @ t.T
    assert torch.allclose(y, want, atol=1e-6), (y - want).abs().max()


class _CachesInEval(torch.nn.Module):
    """Caches a tensor derived from its weight in eval mode, as TinyViT's and LeViT's attention biases do."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 4))
        self.derived_cache = {}

    def forward(self, x):
        if self.training:
            return x @ self.weight.T
        if "w" not in self.derived_cache:
            self.derived_cache["w"] = self.weight.T.clone()
        return x @ self.derived_cache["w"]


def test_an_eval_cache_filled_under_one_mask_does_not_answer_for_another():
    from anpyc.structure.masked import MaskedModel

    torch.manual_seed(0)
    net = _CachesInEval()
    mm = MaskedModel(net, 4).eval()
    x = torch.randn(2, 4)
    outs = []
    for row in (0, 1):
        mask = torch.ones(4, 4)
        mask[row] = 0
        mm.set_masks({"weight": mask}, {}, None)
        with torch.no_grad():
            outs.append(mm.features(x))
        assert torch.allclose(outs[-1], x @ (net.weight * mask).T), row
    assert not torch.allclose(outs[0], outs[1])
