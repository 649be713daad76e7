"""The layer map of ARCHITECTURE.md, checked on the sources: imports point one way, cli -> apps -> export ->
adapters -> anpyc_core, and export never reaches for the learner (an exported model is served without one)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# lowest first: a layer may import itself and the layers before it, never one after it
LAYERS = (("anpyc_core", "anpyc"), ("adapters", "anpyc.adapters"), ("export", "anpyc.export"),
          ("apps", "anpyc.apps"), ("cli", "anpyc.cli"))


def _module_name(path: Path, folder: str, package: str) -> str:
    rel = path.relative_to(ROOT / folder).with_suffix("")
    parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
    return ".".join([package, *parts])


def _sources():
    for folder, package in LAYERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path, folder, _module_name(path, folder, package), path.name == "__init__.py"


def _imports(path: Path, module: str, is_package: bool) -> list[tuple[int, str]]:
    """Every module ``path`` imports (at any depth of the file), relative imports resolved; literal
    ``importlib.import_module("...")`` calls (and f-strings with a literal prefix) count as imports too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if node.module:
                found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((node.lineno, arg.value))
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                found.append((node.lineno, str(arg.values[0].value).rstrip(".")))
    return found


def _layer(name: str) -> int | None:
    """Index in LAYERS of the layer that module ``name`` belongs to (None: not anpyc)."""
    if name != "anpyc" and not name.startswith("anpyc."):
        return None
    best = 0
    for i, (_, package) in enumerate(LAYERS):
        if name == package or name.startswith(package + "."):
            best = i if len(package) > len(LAYERS[best][1]) else best
    return best


def test_every_source_file_is_scanned():
    files = list(_sources())
    assert {folder for _, folder, _, _ in files} == {folder for folder, _ in LAYERS}
    assert any(m == "anpyc.apps.check" for _, _, m, _ in files)
    assert any(m == "anpyc.export.exporter" for _, _, m, _ in files)


def test_imports_point_down_the_layers():
    upward = []
    for path, folder, module, is_package in _sources():
        own = _layer(module)
        for line, name in _imports(path, module, is_package):
            layer = _layer(name)
            if layer is not None and layer > own:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({LAYERS[own][0]}) imports {name} "
                              f"({LAYERS[layer][0]})")
    assert not upward, "imports against the layer order cli -> apps -> export -> adapters -> anpyc_core:\n" + \
        "\n".join(upward)


def test_export_never_imports_the_learner():
    hits = []
    for path in sorted((ROOT / "export").rglob("*.py")):
        module = _module_name(path, "export", "anpyc.export")
        for line, name in _imports(path, module, path.name == "__init__.py"):
            if name == "anpyc.learner" or name.startswith("anpyc.learner.") or name.endswith(".ContinualLearner"):
                hits.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not hits, "export/ must not import the learner (applications live in apps/):\n" + "\n".join(hits)


@pytest.mark.parametrize("source, module, package, expected", [
    ("from .exporter import export_all", "anpyc.export.check", False, "anpyc.export.exporter"),
    ("from ..learner import ContinualLearner", "anpyc.export.check", False, "anpyc.learner"),
    ("from . import onnx", "anpyc.export", True, "anpyc.export.onnx"),
    ("import importlib\nimportlib.import_module(f'anpyc.cli.commands.{x}')", "anpyc.cli.app", False,
     "anpyc.cli.commands"),
])
def test_the_scan_resolves_imports(tmp_path, source, module, package, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert expected in {name for _, name in _imports(path, module, package)}


def test_the_map_names_every_layer_and_room():
    """ARCHITECTURE.md states the order tested above and names every module and package of the engine, and every
    file of the structure walk; a new room, or one that is gone, makes this fail until the map follows."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    order = " -> ".join(folder for folder, _ in reversed(LAYERS))
    assert order in text, order
    assert all(f"`{folder}/`" in text for folder, _ in LAYERS)
    core = ROOT / "anpyc_core"
    rooms = {p.name for p in core.glob("*.py") if p.name != "__init__.py"}
    rooms |= {p.name + "/" for p in core.iterdir() if (p / "__init__.py").exists()}
    missing = sorted(r for r in rooms if f"`{r}`" not in text)
    assert not missing, f"ARCHITECTURE.md does not name {missing}"
    walk_files = {p.stem for p in (core / "structure").glob("*.py") if p.name != "__init__.py"}
    missing = sorted(f for f in walk_files if f"`{f}`" not in text)
    assert not missing, f"ARCHITECTURE.md does not name structure/{missing}"
    named = set(re.findall(r"`([a-z_]+\.py)`", text))
    gone = sorted(m for m in named if not any((ROOT / f).joinpath(m).exists() or (ROOT / f / "commands" / m).exists()
                                              for f, _ in LAYERS))
    assert not gone, f"ARCHITECTURE.md names files that do not exist: {gone}"


def test_no_source_file_outgrows_one_job():
    """One job per file: no source file of the four library folders runs past 450 lines (split it by concept, as
    learner/runner, masks/maskfile, runtime/preprocess are)."""
    long = sorted(f"{p.relative_to(ROOT)} ({n} lines)" for folder in ("anpyc_core", "adapters", "export", "cli")
                  for p in (ROOT / folder).rglob("*.py") if (n := len(p.read_text().splitlines())) > 450)
    assert not long, "files over 450 lines: " + ", ".join(long)
