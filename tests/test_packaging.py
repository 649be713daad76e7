"""The folders install under one namespace: both the wheel and the editable install import cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"anpyc_core": "anpyc", "adapters": "anpyc.adapters", "export": "anpyc.export", "apps": "anpyc.apps",
           "cli": "anpyc.cli"}


def _source_packages() -> set[str]:
    found = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    return found


def test_pyproject_lists_every_package():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == {name: folder for folder, name in FOLDERS.items()}
    assert set(cfg["packages"]) == _source_packages()


def test_wheel_has_one_namespace_and_imports(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("anpyc-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"anpyc", wheel.name.split("-py3")[0] + ".dist-info"}
    for pkg in _source_packages():
        assert pkg.replace(".", "/") + "/__init__.py" in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "anpyc = anpyc.cli.app:main" in entry
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()\n"
        "                    and 'editable' not in getattr(f, '__name__', '').lower()]\n"
        f"sys.path.insert(0, {str(site)!r})\n"
        "import anpyc, anpyc.cli.app, anpyc.export.runtime, anpyc.adapters.data, anpyc.structure\n"
        "import anpyc.apps.check, anpyc.apps.quickstart\n"
        f"assert anpyc.__file__.startswith({str(site)!r}), anpyc.__file__\n"
        "assert 'adapters' not in sys.modules and 'export' not in sys.modules and 'cli' not in sys.modules\n"
        "assert 'apps' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_editable_install_imports_from_the_repo():
    code = ("import sys, anpyc, anpyc.cli.app, anpyc.export.runtime, anpyc.adapters.backbones, anpyc.apps.check;"
            "import anpyc.apps.quickstart as q; assert q.__file__.startswith(%r), q.__file__;"
            "print(anpyc.__file__); assert 'adapters' not in sys.modules and 'apps' not in sys.modules"
            % str(ROOT / "apps"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == (ROOT / "anpyc_core" / "__init__.py").resolve()
