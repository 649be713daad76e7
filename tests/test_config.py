"""Every configuration value that picks a behaviour is checked when the config is built, against the registry that
implements it; numbers against their range; the optimiser a name asks for is the one built."""

from __future__ import annotations

import pytest
import torch

from anpyc.config import OptimConfig, to_dict
from anpyc.configure import load_config, method_config
from anpyc.errors import ConfigError
from anpyc.training import make_optimizer, train_epoch

from test_bad_inputs import invoke, user_error

CHOICES = {
    "optim.name": ("adamx", "adam, adamw, sgd"),
    "importance.measure": ("entropy", "entropy_taylor, fisher, magnitude, mas, si"),
    "importance.accumulate": ("mean", "max, sum"),
    "prune.mode": ("stepwise", "gradual, guarded, none, schedule, search"),
    "prune.granularity": ("channel", "element, unit"),
    "consolidation.rule": ("soft", "gate, hard, none, quadratic"),
    "replay": ("some", "all, none"),
}


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_unknown_choice_names_the_valid_ones(key):
    bad, valid = CHOICES[key]
    with pytest.raises(ConfigError) as e:
        method_config("anpyc", **{key: bad})
    assert e.value.one_line == f"config key {key!r} has unknown value {bad!r} (choose one of: {valid})"


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_config_files_are_checked_too(key):
    """A run's recorded config (run.json) goes through the same checks when it is read back."""
    doc = to_dict(method_config("anpyc"))
    section, _, field = key.rpartition(".")
    (doc[section] if section else doc)[field] = CHOICES[key][0]
    with pytest.raises(ConfigError, match="has unknown value"):
        load_config(doc)


@pytest.mark.parametrize("key, value, span", [
    ("optim.lr", 0.0, "> 0"), ("optim.momentum", 1.0, "[0, 1)"), ("optim.batch_size", 0, ">= 1"),
    ("optim.dropout", 1.0, "[0, 1)"), ("prune.steps.step", 0.0, "(0, 1]"),
    ("prune.steps.max_ratio", 1.5, "[0, 1]"),
    ("prune.tolerance", -0.1, "[0, 1]"), ("prune.min_units_per_group", 0, ">= 1"),
    ("consolidation.strength", -1.0, ">= 0"), ("eval_batch_size", 0, ">= 1"), ("importance.batch_size", 0, ">= 1"),
])
def test_numbers_outside_their_range(key, value, span):
    with pytest.raises(ConfigError) as e:
        method_config("anpyc", **{key: value})
    assert e.value.one_line == f"config key {key!r} is {value!r}, outside its valid range {span} (set {key} within it)"


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW)])
def test_the_optimizer_asked_for_is_built(name, cls):
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], OptimConfig(name=name, lr=0.01))
    assert type(opt) is cls


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_weight_decay_spares_old_elements_and_differs_by_optimizer(name):
    """Decay shrinks only elements no earlier task uses; AdamW's is decoupled, Adam's is an L2 gradient, so the
    two give different weights from the same start."""
    from anpyc.consolidation import create_consolidation
    from anpyc.config import ConsolidationConfig
    from anpyc.importance import create_importance

    def run(opt_name):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4, 3))
        start = w.detach().clone()
        old = torch.zeros(4, 3, dtype=torch.bool)
        old[:2] = True
        cfg = OptimConfig(name=opt_name, lr=0.1, momentum=0.0, weight_decay=0.5)
        opt = make_optimizer([w], cfg)
        hard = create_consolidation(ConsolidationConfig(rule="hard"))
        hard.begin({"w": w}, {"w": torch.ones(4, 3)}, {"w": start.clone()}, {"w": old})
        batches = [((torch.zeros(1, 3), torch.zeros(1, dtype=torch.long)), 1.0)] * 3
        forward = lambda x, b: x @ w.t() * 0.0  # noqa: E731 -- a zero loss gradient: only decay moves weights
        train_epoch(forward, batches, opt, {"w": w}, hard, create_importance("magnitude"), cfg,
                    decay_mask={"w": (~old).float()}, device=torch.device("cpu"))
        return start, w.detach()

    start, end = run(name)
    assert torch.equal(end[:2], start[:2])  # old rows untouched
    assert bool((end[2:].abs() < start[2:].abs()).all())  # new rows shrink
    if name == "adamw":
        _, adam = run("adam")
        assert not torch.allclose(end[2:], adam[2:])
        assert torch.allclose(end[2:], start[2:] * (1 - 0.1 * 0.5) ** 3)  # decoupled: theta *= 1 - lr * wd


def test_cli_reports_an_unknown_optimizer(tmp_path):
    r = invoke("train", "--model", "mlp", "--data", "synthetic", "--out", tmp_path / "run", "--set", "optim.name=adamx")
    line = user_error(r, "optim.name", "adamx", "adam, adamw, sgd")
    assert line == "error: config key 'optim.name' has unknown value 'adamx' (choose one of: adam, adamw, sgd)"
    assert not (tmp_path / "run").exists()


def test_flat_prune_keys_of_older_versions_still_read():
    """Before the prune table was nested, its keys were flat (prune.step, prune.expected_tasks, ...): config files,
    --set and the run.json of older runs keep working, and the value given wins over the section's."""
    cfg = method_config("packnet", **{"prune.first_ratio": 0.7, "prune.expected_tasks": 5, "prune.search_ratio": 0.5})
    assert (cfg.prune.steps.first_ratio, cfg.prune.plan.expected_tasks, cfg.prune.ladder.ratio) == (0.7, 5, 0.5)
    doc = to_dict(method_config("anpyc"))
    doc["prune"].update(step=0.3, warmup=0.5)
    old = load_config(doc)
    assert old.prune.steps.step == 0.3 and old.prune.gradual.warmup == 0.5
    with pytest.raises(ConfigError) as e:
        method_config("anpyc", **{"prune.warmup": 2.0})
    assert e.value.one_line == ("config key 'prune.gradual.warmup' is 2.0, outside its valid range [0, 1] "
                                "(set prune.gradual.warmup within it)")
