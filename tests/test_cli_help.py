"""The CLI's surface: every command is registered and documented, and help never imports torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from anpyc.cli.app import COMMANDS, app

OWN = ("quickstart", "train", "eval", "inspect", "models", "check")
HEAVY = ("torch", "timm", "onnx", "onnxruntime", "matplotlib", "numpy", "PIL", "sklearn")


def test_help_imports_no_heavy_module():
    """`anpyc --help` and every `anpyc CMD --help`, in a fresh interpreter: torch & co stay unimported."""
    names = [name for name, _ in COMMANDS]
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from anpyc.cli.app import app\n"
        f"for args in [['--help']] + [[c, '--help'] for c in {names!r}]:\n"
        "    r = CliRunner().invoke(app, args)\n"
        "    assert r.exit_code == 0, (args, r.output)\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_console_entry_point_help_is_fast_and_light():
    """`python -m anpyc.cli --help` (what the console script runs) with -X importtime: no torch import at all."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "anpyc.cli", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "timm" not in imported
    for name in OWN:
        assert name in r.stdout


@pytest.mark.parametrize("name", OWN)
def test_every_own_command_is_registered_with_help(name):
    assert name in dict(COMMANDS)
    r = CliRunner(env={"COLUMNS": "200"}).invoke(app, [name, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage: anpyc " + name in " ".join(r.output.split())


def test_method_choices_follow_the_registry():
    from anpyc.cli.commands.train import Method
    from anpyc.presets import METHODS

    assert sorted(m.value for m in Method) == METHODS.names()


def test_help_text_keeps_bracketed_defaults():
    """Rich markup would swallow an unescaped "[default: ...]"; ours are escaped."""
    r = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["train", "--help"])
    assert r.exit_code == 0
    flat = " ".join(r.output.split())
    assert "[default: anpyc]" in flat and "[optim]" in flat
