"""Issue 3's must-show on real learned runs: every task of five backbones exports with onnxruntime parity
<= 1e-4, and an export's size follows its task's units (a later task's file is larger exactly when it owns more)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import anpyc
from anpyc.structure import randomize_norms

from conftest import fast_config, tiny_stream


@pytest.mark.parametrize("model", ["test_resnet", "test_vit", "test_convnext", "test_efficientnet", "mlp"])
def test_learned_tasks_export_with_parity_and_size_follows_units(model, tmp_path):
    from anpyc.export.exporter import export_all
    from anpyc.export.runtime import load_export

    stream = tiny_stream(model, num_tasks=3)
    learner = anpyc.ContinualLearner(model, input_spec=stream.input_spec, config=fast_config())
    with torch.no_grad():  # timm zero-initialises some norms: randomise so that parity means something
        randomize_norms(learner.trunk, torch.Generator().manual_seed(0))
    learner.fit(stream)
    sidecars = export_all(learner, tmp_path / "export")
    assert [s["task"] for s in sidecars] == [0, 1, 2]
    models = load_export(tmp_path / "export")
    x = torch.stack([stream[0].test[i][0] for i in range(5)])
    active = [int(learner.space.active(k).sum()) for k in range(3)]
    sizes = []
    for s in sidecars:
        assert s["parity"]["max_abs_diff"] <= 1e-4
        ort = models.logits(s["task"], x.numpy())
        ref = learner.reference_forward(s["task"], x).numpy()
        assert np.abs(ort - ref).max() <= 1e-4
        sizes.append((tmp_path / "export" / s["file"]).stat().st_size)
        assert s["params"] == sum(p.numel() for p in learner.subnetwork(s["task"]).parameters())
    dense = sum(p.numel() for p in learner.trunk.parameters())
    assert sidecars[0]["params"] < dense, "task 0's model is not smaller than the dense trunk"
    for i in range(2):
        if active[i + 1] > active[i]:
            assert sizes[i + 1] > sizes[i], (active, sizes)
        else:
            assert abs(sizes[i + 1] - sizes[i]) <= 0.02 * sizes[i], (active, sizes)
    assert json.loads((tmp_path / "export" / "manifest.json").read_text())["tasks"]


def test_cli_int8_export_calibrates_on_the_runs_own_data(tmp_path):
    from typer.testing import CliRunner

    from anpyc.cli.app import app

    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--model", "cnn", "--model-opt", "width=4", "--data", "synthetic",
                                 "--data-opt", "samples_per_class=12", "--data-opt", "img_size=16", "--tasks", "1",
                                 "--epochs", "1", "--out", str(run), "--no-progress", "--no-plots"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["export", str(run), "--int8"])
    assert r.exit_code == 0, r.output
    sidecar = json.loads((run / "export" / "task-000.json").read_text())
    assert sidecar["int8"]["mode"] == "static" and sidecar["int8"]["calibration_samples"] > 0
    assert (run / "export" / sidecar["int8"]["file"]).exists()
    assert "top-1 agreement" in r.output
