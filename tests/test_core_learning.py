"""Learning on real offline data, and the pieces the learner is built from (metrics, importance, rules)."""

from __future__ import annotations

import math

import pytest
import torch

import anpyc
from anpyc.config import ConfigError, from_dict, LearnerConfig
from anpyc.configure import method_config
from anpyc.consolidation import create_consolidation
from anpyc.config import ConsolidationConfig
from anpyc.importance import create_importance
from anpyc.metrics import continual_metrics


def test_digits_split_learns_with_spare_capacity():
    """sklearn digits, 5 two-class tasks: ACC well above chance (0.5), no forgetting, capacity left over."""
    from anpyc.adapters.data import make_stream

    stream = make_stream("digits-split", img_size=32)
    cfg = method_config("anpyc", **{"optim.epochs": 8, "optim.batch_size": 32, "prune.step": 0.2,
                                    "prune.min_step": 0.05, "prune.retrain_epochs": 2, "prune.tolerance": 0.02,
                                    "grow.enabled": False})  # a fixed width: its spare capacity is what is asserted
    learner = anpyc.ContinualLearner("test_resnet", input_spec=stream.input_spec, config=cfg)
    m = learner.fit(stream)
    assert m["num_tasks"] == 5
    assert m["acc"] >= 0.85, m["accuracy_matrix"]
    assert m["bwt"] == 0.0  # hard freeze: earlier tasks cannot move
    assert m["capacity"][-1] < 0.9, m["capacity"]
    assert all(a <= b + 1e-9 for a, b in zip(m["capacity"], m["capacity"][1:]))
    assert all(p < m["dense_params"] for p in m["task_params"])
    assert all(0 < f <= m["dense_flops"] for f in m["task_flops"])


def test_metrics_on_a_known_matrix():
    R = [[0.9], [0.8, 0.7], [0.6, 0.7, 1.0]]
    m = continual_metrics(R)
    assert math.isclose(m["acc"], (0.6 + 0.7 + 1.0) / 3)
    assert math.isclose(m["bwt"], ((0.6 - 0.9) + (0.7 - 0.7)) / 2)
    assert [round(f, 6) for f in m["forgetting"]] == [0.3, 0.0]


def test_config_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        from_dict(LearnerConfig, {"optim": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError, match="'seed' must be an integer"):
        from_dict(LearnerConfig, {"seed": "zero"})
    with pytest.raises(ConfigError, match="unknown method 'ewcc'"):
        method_config("ewcc")
    cfg = method_config("ewc", **{"optim.lr": 0.5})
    assert cfg.optim.lr == 0.5 and cfg.importance.measure == "fisher" and cfg.prune.mode == "none"


def _toy():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x = torch.randn(256, 8)
    y = torch.randint(0, 3, (256,))
    return net, x, y


@pytest.mark.parametrize("measure", ["entropy_taylor", "fisher", "mas"])
def test_importance_does_not_scale_with_batch_size(measure):
    net, x, y = _toy()
    params = dict(net.named_parameters())
    imp = create_importance(measure)

    def scores(bs):
        batches = [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]
        s = imp.compute(net, params, batches)
        return sum(float(v.sum()) for v in s.values())

    small, large = scores(16), scores(128)
    assert small > 0 and large > 0
    assert 0.25 < small / large < 4.0, (small, large)  # a summed-over-batch score would differ ~8x


def test_entropy_taylor_matches_its_formula():
    net, x, y = _toy()
    params = dict(net.named_parameters())
    s = create_importance("entropy_taylor").compute(net, params, [(x, y)])
    logp = torch.log_softmax(net(x), 1)
    h = -(logp.exp() * logp).sum(1).mean()
    g = torch.autograd.grad(h, list(params.values()))
    for (n, p), gi in zip(params.items(), g):
        gp = gi * p
        assert torch.allclose(s[n], torch.relu(gp + 0.5 * gp * gp), atol=1e-7)


def test_consolidation_rules():
    p = torch.nn.Parameter(torch.ones(4))
    params = {"w": p}
    omega = {"w": torch.tensor([0.0, 1.0, 2.0, 4.0])}
    anchor = {"w": torch.zeros(4)}
    old = {"w": torch.tensor([True, True, True, False])}
    quad = create_consolidation(ConsolidationConfig(rule="quadratic", strength=2.0))
    quad.begin(params, omega, anchor, old)
    # omega normalised by its mean over old, non-zero elements (1.5): (0 + 1/1.5 + 2/1.5) * 1^2 * 2
    assert math.isclose(float(quad.penalty(params).detach()), 2.0 * 3.0 / 1.5, rel_tol=1e-6)
    hard = create_consolidation(ConsolidationConfig(rule="hard"))
    hard.begin(params, omega, anchor, old)
    p.grad = torch.ones(4)
    hard.gate(params)
    assert p.grad.tolist() == [0.0, 0.0, 0.0, 1.0]
    with torch.no_grad():
        p.add_(5.0)
    hard.end_epoch(params)
    assert p.detach().tolist() == [0.0, 0.0, 0.0, 6.0]
    gate = create_consolidation(ConsolidationConfig(rule="gate", gate_quantile=1.0))
    gate.begin(params, omega, anchor, old)
    p.grad = torch.ones(4)
    gate.gate(params)
    assert p.grad.tolist() == pytest.approx([1.0, 0.5, 0.0, 1.0])


@pytest.mark.parametrize("method", ["anpyc", "finetune"])
def test_batchnorm_statistics_follow_the_parameters(method):
    """Frozen tasks keep the statistics they ended with; shared, still-changing weights share the latest ones."""
    from conftest import fast_config, tiny_stream

    cfg = fast_config(method, **({"prune.mode": "none"} if method == "finetune" else {}))  # same units in both
    learner = anpyc.ContinualLearner("cnn", input_spec=tiny_stream("cnn").input_spec, config=cfg)
    stream = tiny_stream("cnn", num_tasks=2)
    for task in stream:
        learner.learn(task)
    bn = {n: m for n, m in learner.subnetwork(0).trunk.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    bn_last = dict(learner.subnetwork(1).trunk.named_modules())
    assert bn, "the cnn backbone has BatchNorm layers"
    same = [torch.equal(m.running_mean, bn_last[n].running_mean) for n, m in bn.items() if n in bn_last]
    if method == "finetune":
        # every task runs with the statistics of the current weights: the ones the last task ended with
        assert all(same) and len(same) == len(bn)
        x = stream[0].test[0][0].unsqueeze(0)
        learner.model.eval()
        learner.runner.use(1)
        with torch.no_grad():
            ref = learner.model(x, 0)
        assert torch.equal(learner.reference_forward(stream[0].id, x), ref)
    else:
        assert not all(same)  # task 0's own statistics, not the ones task 1 ended with


@pytest.mark.parametrize("optim", ["sgd", "adam", "adamw"])
def test_hard_rule_keeps_old_elements_exact_between_restores(optim):
    """The hard rule restores old elements once per epoch; in between, zeroed gradients must not move them."""
    from anpyc.config import OptimConfig
    from anpyc.training import make_optimizer

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5))
    old = {"w": torch.rand(6, 5) < 0.5}
    start = w.detach().clone()
    hard = create_consolidation(ConsolidationConfig(rule="hard"))
    hard.begin({"w": w}, {"w": torch.rand(6, 5)}, {"w": start.clone()}, old)
    opt = make_optimizer([w], OptimConfig(name=optim, lr=0.1, momentum=0.9))
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        (w.sin() * torch.randn(6, 5)).sum().backward()
        hard.gate({"w": w})
        opt.step()
        assert torch.equal(w.detach()[old["w"]], start[old["w"]])  # bit-exact, before any restore
    assert not torch.equal(w.detach()[~old["w"]], start[~old["w"]])  # the other elements learn


def test_paper_mode_is_the_original_net_evaluated_without_task_masks():
    """--method paper on "mlp": the original 784-64-32 MLP with dropout 0.5, and every task runs on the whole current
    network (the newest task's mask) with its own head, as the original evaluates; its export computes the same."""
    from anpyc.adapters.data import synthetic_stream

    stream = synthetic_stream(num_tasks=2, samples_per_class=12, vector=True, dim=784, seed=0)
    cfg = method_config("paper", **{"optim.epochs": 1, "prune.retrain_epochs": 1, "importance.max_batches": 2})
    assert cfg.inference == "shared" and method_config("anpyc").inference == "task"
    learner = anpyc.ContinualLearner("mlp", input_spec=stream.input_spec, config=cfg)
    linears = [m for m in learner.trunk.modules() if isinstance(m, torch.nn.Linear)]
    drops = [m for m in learner.trunk.modules() if isinstance(m, torch.nn.Dropout)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 64), (64, 32)]
    assert [m.p for m in drops] == [0.5, 0.5]
    assert learner.backbone["kwargs"] == {"hidden": [64, 32], "dropout": 0.5}
    learner.fit(stream)
    x = torch.randn(4, 784, generator=torch.Generator().manual_seed(3))
    t0, t1 = learner.task_ids()
    # task 0 runs with task 1's mask (the whole network): the elements task 1 claimed change task 0's output
    assert learner.mask_digest(t0) == learner.mask_digest(t1) == learner.space.digest(1) != learner.space.digest(0)
    y = learner.reference_forward(t0, x)
    with torch.no_grad():
        assert float((learner.subnetwork(t0)(x) - y).abs().max()) <= 1e-5
    learner.runner.use(1)
    learner.model.eval()
    with torch.no_grad():
        assert torch.equal(learner.model(x, 0), y)  # task 0's head on the newest mask


def test_inference_choice_is_validated():
    with pytest.raises(ConfigError, match="inference.*shared"):
        method_config("anpyc", inference="all")


@pytest.mark.parametrize("grow", [False, True])
def test_every_task_trains_its_own_head_from_its_first_epoch(grow):
    """The default (gradual) trains its ramp epochs in the prune phase; the optimizer of those epochs must not reach
    the next task, whose first epochs would then train the last task's head (and, after a growth, parameters the
    trunk no longer holds) instead of its own."""
    from anpyc.adapters.data import synthetic_stream
    from anpyc.events import Epoch
    from anpyc.learner import Callback

    stream = synthetic_stream(num_tasks=3, samples_per_class=16, vector=True, dim=24, seed=3)
    seen: list[tuple[int, int, bool, bool]] = []

    class Probe(Callback):
        def on_event(self, event):
            if isinstance(event, Epoch) and event.phase == "train":
                opt = {id(p) for g in learner.runner.optimizer.param_groups for p in g["params"]}
                k = learner._index(event.task)
                head = all(id(p) in opt for p in learner.model.heads[str(k)].parameters())
                trunk = all(id(p) in opt for p in learner.runner.params().values())
                seen.append((event.task, event.epoch, head, trunk))

    cfg = method_config("anpyc", **{"optim.epochs": 4, "optim.batch_size": 8, "importance.max_batches": 2,
                                    "grow.enabled": grow, "grow.min_free": 0.75, "threads": 1})
    learner = anpyc.ContinualLearner("mlp", input_spec=stream.input_spec, config=cfg, model_kwargs={"hidden": [16]},
                                     callbacks=[Probe()])
    learner.fit(stream)
    assert cfg.prune.mode == "gradual" and [s[:2] for s in seen] == [(t, e) for t in range(3) for e in range(4)]
    assert all(head and trunk for *_, head, trunk in seen), seen
    assert bool(learner.state.growth) == grow
