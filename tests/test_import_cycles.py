"""The engine has no runtime import cycle: every module of anpyc_core can be understood (and imported) after the
modules it depends on, and config.py is a leaf."""

from __future__ import annotations

import ast
from pathlib import Path


def _engine_imports() -> dict[str, set[str]]:
    """Module -> the engine modules it imports at run time (anywhere in it, lazily inside functions included;
    ``if TYPE_CHECKING:`` blocks and the package's lazy public-name loader left out)."""
    root = Path(__file__).resolve().parents[1] / "anpyc_core"
    mods = {}
    for p in root.rglob("*.py"):
        parts = list(p.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(["anpyc", *parts])] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        if m == "anpyc":  # the facade: resolves public names lazily, imported by nothing in the engine
            continue
        tree = ast.parse(p.read_text())
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                for n in ast.walk(node)}
        package = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
                    if target in mods and target != m and target != "anpyc":
                        graph[m].add(target)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name in mods and a.name not in (m, "anpyc"))
    return graph


def test_the_engine_has_no_runtime_import_cycle():
    graph = _engine_imports()
    assert graph["anpyc.learner"] >= {"anpyc.runner", "anpyc.checkpoint"}  # the scan sees imports
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "runtime import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])
