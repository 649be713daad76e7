"""anpyc.apps.check: a backbone walks, learns two pruned tasks and exports with parity, or says why not."""

from __future__ import annotations

import pytest

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
