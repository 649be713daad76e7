"""No code execution from files (no pickle, no unsafe loaders), and determinism (same seed -> same result)."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

import anpyc

from conftest import fast_config, tiny_stream

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["anpyc_core", "adapters", "export", "cli", "benchmarks"]
BANNED_MODULES = {"pickle", "cPickle", "dill", "shelve", "marshal", "joblib", "cloudpickle"}


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Loads that can run code from a file: pickle & co, torch.load without weights_only=True, numpy loads with
    allow_pickle=True, yaml.load/unsafe_load/full_load, torch.jit.load, eval/exec."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BANNED_MODULES:
            found.append(f"from {node.module} import")
        elif isinstance(node, ast.Call):
            f = node.func
            name = ast.unparse(f)
            kw = {k.arg: k.value for k in node.keywords}
            if name in ("eval", "exec"):
                found.append(name)
            elif name.endswith("torch.load"):
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    found.append(f"{name} without weights_only=True")
            elif name.endswith(("np.load", "numpy.load")):
                ap = kw.get("allow_pickle")
                if isinstance(ap, ast.Constant) and ap.value is True:
                    found.append(f"{name}(allow_pickle=True)")
            elif name.endswith(("yaml.load", "yaml.unsafe_load", "yaml.full_load", "jit.load")):
                found.append(name)
    return [f"{filename}:{x}" for x in found]


def test_scanner_has_teeth():
    bad = "import pickle\nimport torch, yaml, numpy as np\ntorch.load('x')\nnp.load('y', allow_pickle=True)\n" \
          "yaml.load(s)\neval('1')\ntorch.load('z', weights_only=True)\n"
    hits = unsafe_calls(bad)
    assert len(hits) == 5, hits


def test_source_has_no_unsafe_loads():
    hits = []
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            hits += unsafe_calls(path.read_text(), str(path.relative_to(ROOT)))
    assert hits == []


def test_same_seed_same_masks_and_metrics():
    runs = []
    for _ in range(2):
        stream = tiny_stream("test_resnet", num_tasks=2)
        learner = anpyc.ContinualLearner("test_resnet", input_spec=stream.input_spec,
                                         config=fast_config(**{"prune.mode": "guarded", "prune.tolerance": 0.2}))
        m = learner.fit(stream)
        runs.append((learner.space.owners.clone(), m, [p.detach().clone() for p in learner.trunk.parameters()]))
    (o1, m1, p1), (o2, m2, p2) = runs
    assert torch.equal(o1, o2)
    assert m1["accuracy_matrix"] == m2["accuracy_matrix"] and m1["capacity"] == m2["capacity"]
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    stream = tiny_stream("test_resnet", num_tasks=2)
    other = anpyc.ContinualLearner("test_resnet", input_spec=stream.input_spec,
                                   config=fast_config(seed=1, **{"prune.mode": "guarded", "prune.tolerance": 0.2}))
    other.fit(stream)
    assert not all(torch.equal(a, b) for a, b in zip(p1, other.trunk.parameters()))  # the seed matters
