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


DYNAMIC_IMPORTS = ("importlib.import_module", "import_module", "__import__", "importlib.__import__",
                   "pkgutil.resolve_name", "resolve_name", "runpy.run_module", "runpy.run_path",
                   "importlib.util.spec_from_file_location", "spec_from_file_location", "SourceFileLoader")


def _literal(node: ast.AST) -> bool:
    """A literal made of strings, numbers and containers of them (a table written in the code)."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return all(_literal(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(k is not None and _literal(k) for k in node.keys) and all(_literal(v) for v in node.values)
    return False


def _literal_tables(tree: ast.Module) -> set[str]:
    """Module-level names bound to a literal table."""
    names = set()
    for node in tree.body:
        targets, value = [], None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        if value is not None and _literal(value):
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _from_table(expr: ast.AST, tables: set[str]) -> bool:
    """``TABLE``, ``TABLE[...]``, ``TABLE.get(...)``, ``TABLE.items()/values()/keys()`` of a literal table."""
    if isinstance(expr, ast.Name):
        return expr.id in tables
    if isinstance(expr, ast.Subscript):
        return _from_table(expr.value, tables)
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) \
            and expr.func.attr in ("get", "items", "values", "keys"):
        return _from_table(expr.func.value, tables)
    return False


def _bound_from_tables(scope: ast.AST, name: str, tables: set[str]) -> bool:
    """Every binding of ``name`` in ``scope`` takes its value from a literal table (or a literal)."""
    bindings = []
    for node in ast.walk(scope):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            bindings.append(_literal(node.value) or _from_table(node.value, tables))
        elif isinstance(node, (ast.For, ast.comprehension)):
            target = node.target
            names = [t.id for t in ast.walk(target) if isinstance(t, ast.Name)]
            if name in names:
                bindings.append(_from_table(node.iter, tables))
    return bool(bindings) and all(bindings)


def dynamic_imports(source: str, filename: str = "<src>") -> list[str]:
    """Imports whose module name is computed at run time from anything but a table written in the code: a value
    read from a file (a run's ``module:function``, a manifest field) must never choose what is imported."""
    tree = ast.parse(source, filename)
    tables = _literal_tables(tree)
    calls: list[tuple[ast.Call, ast.AST]] = []  # (call, innermost enclosing function or the module)

    def visit(node: ast.AST, scope: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) else scope
            if isinstance(child, ast.Call) and ast.unparse(child.func) in DYNAMIC_IMPORTS and child.args:
                calls.append((child, scope))
            visit(child, inner)

    visit(tree, tree)
    found = []
    for node, scope in calls:
        arg = node.args[0]
        if _literal(arg) or _from_table(arg, tables):
            continue
        names = [n.id for n in ast.walk(arg) if isinstance(n, ast.Name)]
        # a plain name, or an f-string of literal text and plain names
        parts_ok = isinstance(arg, ast.Name) or isinstance(arg, ast.JoinedStr) and all(
            isinstance(v, ast.Constant) or isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.Name)
            for v in arg.values)
        if names and parts_ok and all(_bound_from_tables(scope, n, tables) or _bound_from_tables(tree, n, tables)
                                      for n in names):
            continue
        found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_dynamic_import_scanner_has_teeth():
    bad = ("import importlib, json\n"
           "def load(path):\n"
           "    spec = json.load(open(path))['backbone']['factory']\n"
           "    mod, _, fn = spec.partition(':')\n"
           "    return getattr(importlib.import_module(mod), fn)\n"
           "def other(doc):\n"
           "    return __import__(doc['module'])\n")
    assert len(dynamic_imports(bad)) == 2
    good = ("import importlib\n"
            "TABLE = {'a': 'anpyc.learner', 'b': 'anpyc.config'}\n"
            "COMMANDS = (('train', 'train'), ('eval', 'eval'))\n"
            "def f(name):\n"
            "    module = TABLE.get(name)\n"
            "    return importlib.import_module(module)\n"
            "for _n, _m in COMMANDS:\n"
            "    importlib.import_module(f'anpyc.cli.commands.{_m}')\n"
            "importlib.import_module('anpyc.export')\n")
    assert dynamic_imports(good) == []


def test_source_imports_no_code_named_by_data():
    hits = []
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            hits += dynamic_imports(path.read_text(), str(path.relative_to(ROOT)))
    assert hits == []


def test_core_imports_nothing_by_string():
    """The engine imports only with import statements: no import_module/__import__ at all in anpyc_core/."""
    hits = []
    for path in (ROOT / "anpyc_core").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        hits += [f"{path.name}:{n.lineno}" for n in ast.walk(tree)
                 if isinstance(n, ast.Call) and ast.unparse(n.func) in DYNAMIC_IMPORTS]
    assert hits == []


def test_every_public_name_resolves():
    for name in anpyc.__all__:
        assert getattr(anpyc, name) is not None, name


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
