"""`anpyc models` and `anpyc check` through CliRunner (check with a stand-in checker, and the real one if present)."""

from __future__ import annotations

import json
import sys
import types

import pytest
from typer.testing import CliRunner

from anpyc.cli.app import app


def invoke(*args):
    return CliRunner(env={"COLUMNS": "200"}).invoke(app, [str(a) for a in args])


def test_models_lists_and_filters():
    r = invoke("models", "resnet1*")
    assert r.exit_code == 0, r.output
    assert "resnet18" in r.stdout and "resnet10t" in r.stdout and "vit_" not in r.stdout
    r = invoke("models")
    assert r.exit_code == 0, r.output
    assert "anpyc torch backbones" in r.stdout and "mlp" in r.stdout and "cnn" in r.stdout
    assert "timm models" in r.stdout and "mobilenetv3_small_050" in r.stdout
    r = invoke("models", "mobilenet", "--limit", "2")
    assert r.exit_code == 0, r.output
    assert "more (--limit 0 shows all)" in r.stdout
    r = invoke("models", "no-such-net*")
    assert r.exit_code == 2 and r.stderr.startswith("error: no model matches 'no-such-net*'")
    r = invoke("models", "--limit", "-1")
    assert r.exit_code == 2


@pytest.fixture
def stand_in_checker(monkeypatch):
    calls = []

    def check_model(name, img_size=None, num_tasks=2, steps=None, out_dir=None, min_prunable=0.5):
        calls.append({"name": name, "img_size": img_size, "num_tasks": num_tasks, "steps": steps, "out_dir": out_dir,
                      "min_prunable": min_prunable})
        ok = name != "test_vit"
        return {"model": name, "ok": ok, "reason": "" if ok else "parity 3e-2 > 1e-4 on task 1", "groups": 11,
                "rejected": 0 if ok else 2, "units": 672, "params_per_task": [5638, 10268],
                "parity": [1e-6, 2e-6] if ok else [1e-6, 3e-2], "seconds": 4.2}

    module = types.ModuleType("anpyc.apps.check")
    module.check_model = check_model
    monkeypatch.setitem(sys.modules, "anpyc.apps.check", module)
    return calls


def test_check_reports_ok_and_not_ok(stand_in_checker):
    r = invoke("check", "test_resnet", "--img-size", "48", "--steps", "3")
    assert r.exit_code == 0, r.output
    out = " ".join(r.stdout.split())
    assert "OK: test_resnet walks, masks and exports cleanly" in out and "params per task 5.64k, 10.3k" in out
    assert stand_in_checker[-1] == {"name": "test_resnet", "img_size": 48, "num_tasks": 2, "steps": 3, "out_dir": None,
                                    "min_prunable": 0.5}
    r = invoke("check", "test_vit", "--json")
    assert r.exit_code == 1, r.output
    assert json.loads(r.stdout)["reason"] == "parity 3e-2 > 1e-4 on task 1"
    r = invoke("check", "test_vit")
    assert r.exit_code == 1 and "NOT OK: test_vit: parity 3e-2 > 1e-4 on task 1" in " ".join(r.stdout.split())
    r = invoke("check", "resnet1000")
    assert r.exit_code == 2 and r.stderr.startswith("error: unknown model 'resnet1000'") and "did you mean" in r.stderr
    r = invoke("check", "test_resnet", "--tasks", "0")
    assert r.exit_code == 2


def test_check_with_the_real_checker(tmp_path):
    r = invoke("check", "test_resnet", "--out", tmp_path / "check", "--steps", "1", "--threads", "1")
    assert r.exit_code == 0, r.output
    assert "OK: test_resnet" in " ".join(r.stdout.split())
