"""anpyc.apps.check: a backbone walks, learns two pruned tasks and exports with parity, or says why not."""

from __future__ import annotations

import json
import re

import pytest
import torch

from anpyc.apps.check import check_model, find_input_size


@pytest.mark.parametrize("model", ["test_resnet", "test_vit"])
def test_check_passes_with_parity(model, tmp_path):
    r = check_model(model, steps=1, out_dir=tmp_path, threads=1)
    assert r["ok"], r["reason"]
    assert r["reason"] == "" and r["stage"] == "done"
    assert r["img_size"] == 32
    assert r["groups"] > 0 and r["units"] > 0 and r["prunable_fraction"] > 0.9
    assert len(r["parity"]) == 2 and max(r["parity"]) <= 1e-4
    assert len(r["exporter"]) == 2
    # pruning leaves each task a real subset of the dense model
    assert len(r["params_per_task"]) == 2 and all(p < r["dense_params"] for p in r["params_per_task"])
    assert sorted((tmp_path / "export").glob("task-*.onnx")), "the exported files are kept in out_dir"
    if model == "test_vit":
        assert r["group_kinds"].get("heads", 0) > 0


def test_unknown_model_is_reported_not_raised():
    r = check_model("no_such_backbone_xyz", steps=1)
    assert not r["ok"] and r["stage"] == "create" and r["reason"].startswith("create:")


def test_export_failure_is_reported(monkeypatch):
    from anpyc.export import exporter

    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(exporter, "export_all", broken)
    r = check_model("mlp", steps=1, num_tasks=1)
    assert not r["ok"] and r["reason"] == "export: RuntimeError: exporter exploded"
    assert r["groups"] > 0 and r["params_per_task"], "the stages before the failure are still reported"


def test_input_size_search():
    assert find_input_size("test_resnet") == (32, "")
    size, why = find_input_size("no_such_backbone_xyz")
    assert size == 0 and why


# ------------------------------------------------------------------------------------------------ an honest check

class Rolled(torch.nn.Module):
    """Every traced group is wrong: a channel roll after each conv mixes kept and removed channels, so slicing
    changes the numbers and verification rejects all groups (the model would export its dense trunk per task)."""

    def __init__(self, input_spec=None):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(16)
        self.num_features = 16

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x))).roll(1, dims=1)
        y = torch.relu(self.bn2(self.conv2(y))).roll(1, dims=1)
        return y.mean((2, 3))


class ExportsDifferently(torch.nn.Module):
    """Walks, learns and prunes like any CNN, but computes something else while an ONNX exporter traces it."""

    def __init__(self, input_spec=None):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.num_features = 16

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            y = y * 3.0 + 7.0
        return y


@pytest.fixture
def registered(monkeypatch):
    from anpyc.backbones import BACKBONES

    monkeypatch.setitem(BACKBONES._items, "test_rolled", Rolled)
    monkeypatch.setitem(BACKBONES._items, "test_exports_differently", ExportsDifferently)


def _invoke(*args):
    from typer.testing import CliRunner

    from anpyc.cli.app import app

    return CliRunner(env={"COLUMNS": "200"}).invoke(app, [str(a) for a in args])


def test_all_groups_rejected_fails_with_the_share(registered, tmp_path):
    r = check_model("test_rolled", steps=1, num_tasks=1, threads=1, out_dir=tmp_path)
    assert r["groups"] == 0 and r["rejected"]["count"] == 2
    assert not r["ok"] and r["stage"] == "prunable"
    assert r["prunable_fraction"] == 0.0
    assert r["reason"].startswith("prunable: only 0.0% of the trunk's parameters are in maskable groups, below the "
                                  "required 50%")
    assert "2 groups rejected (2x failed parity" in r["reason"]
    # every rejected group says where parity broke: conv1's roll sits before conv2, conv2's before the features
    where = {g["name"]: (g["tensor"], g["max_abs_diff"]) for g in r["rejected_groups"]}
    assert where["conv1"][0] == "conv2 input" and where["conv2"][0] == "features"
    assert all(0 < d < float("inf") for _, d in where.values())
    assert r["unmasked"][0]["tensor"] == "conv2.weight" and r["unmasked"][0]["share"] > 0.5

    res = _invoke("check", "test_rolled", "--steps", "1", "--tasks", "1", "--threads", "1", "--explain",
                  "--out", tmp_path / "cli")
    assert res.exit_code == 1, res.output
    out = " ".join(res.stdout.split())
    assert "NOT OK: test_rolled: prunable: only 0.0% of the trunk's parameters are in maskable groups" in out
    assert "rejected groups (2):" in out
    m = re.search(r"conv1: parity broke at conv2 input \(max abs diff ([0-9.e+-]+)\)", out)
    assert m and float(m.group(1)) == pytest.approx(where["conv1"][1], rel=1e-2)
    # a lower bar lets the same model pass: the share is what decides
    res = _invoke("check", "test_rolled", "--steps", "1", "--tasks", "1", "--threads", "1", "--min-prunable", "0")
    assert res.exit_code == 0, res.output
    res = _invoke("check", "test_rolled", "--min-prunable", "1.5")
    assert res.exit_code == 2 and "min-prunable is a share between 0 and 1" in res.output


def test_normal_model_passes_with_its_share(tmp_path):
    res = _invoke("check", "test_resnet", "--steps", "1", "--threads", "1", "--explain", "--json",
                  "--out", tmp_path)
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["ok"] and r["prunable_fraction"] >= 0.5 and r["min_prunable"] == 0.5
    res = _invoke("check", "test_resnet", "--steps", "1", "--threads", "1", "--explain", "--out", tmp_path / "b")
    out = " ".join(res.stdout.split())
    assert res.exit_code == 0 and f"prunable {100 * r['prunable_fraction']:.0f}% of the trunk's parameters" in out
    assert "rejected groups: none" in out and "OK: test_resnet" in out


def test_learned_model_failing_onnx_parity_fails_with_the_numbers(registered, tmp_path):
    r = check_model("test_exports_differently", steps=1, num_tasks=1, threads=1, out_dir=tmp_path)
    assert r["groups"] >= 1 and r["prunable_fraction"] >= 0.5 and r["params_per_task"], "walks and learns"
    assert not r["ok"] and r["stage"] == "export"
    m = re.search(r"differs from the torch subnetwork by ([0-9.e+-]+)", r["reason"])
    assert m and float(m.group(1)) > 1.0, r["reason"]
    res = _invoke("check", "test_exports_differently", "--steps", "1", "--tasks", "1", "--threads", "1")
    assert res.exit_code == 1 and "NOT OK" in res.stdout and m.group(1) in " ".join(res.stdout.split())
