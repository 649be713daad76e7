"""ONNX export: parity with the reference in onnxruntime, exact sidecars, nothing left behind on failure, int8, CLI."""

from __future__ import annotations

import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from anpyc.errors import ModelError
from anpyc.export import ExportDirError, ParityError, UnknownTaskError, export_all, export_task, load_export
from anpyc.export import onnx as export_onnx
from anpyc.export.exporter import PARITY_BATCH_SIZES, SIDECAR_KEYS, ExportSource
from anpyc.export.quantize import compare_int8, quantize_task
from anpyc.export.runtime import make_session
from anpyc.export.testing import FakeSource, mlp_source, timm_source
from anpyc.fileio import sha256_file

MODELS = ["test_resnet", "test_vit", "test_convnext", "test_efficientnet", "mlp"]


def _source(name: str, **kw) -> FakeSource:
    return mlp_source(**kw) if name == "mlp" else timm_source(name, **kw)


def _all_files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


def _flat(text: str) -> str:
    """CLI output with rich's box drawing and line wrapping removed."""
    return " ".join(text.replace("│", " ").split())


def _leftover_temp_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob(".anpyc-*")}


@pytest.fixture(scope="module", params=MODELS)
def exported(request, tmp_path_factory):
    src = _source(request.param)
    out = tmp_path_factory.mktemp(f"export-{request.param}")
    sidecars = export_all(src, out)
    return src, out, sidecars


def test_fake_sources_satisfy_the_protocol():
    assert isinstance(mlp_source(), ExportSource)


def test_norms_are_randomised_so_parity_means_something():
    src = timm_source("test_resnet")
    bns = [m for m in src.subnetwork(0).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(float(m.weight.detach().abs().min()) >= 0.5 for m in bns)  # timm zero-inits some; we must not
    assert all(float(m.running_mean.abs().max()) > 0 for m in bns)


def test_export_parity_in_onnxruntime_batch_1_and_3(exported):
    src, out, sidecars = exported
    assert [s["task"] for s in sidecars] == [0]
    path = out / "task-000.onnx"
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")  # dynamic batch
    sess = make_session(path, threads=1)
    g = torch.Generator().manual_seed(123)
    for b in (1, 3):
        x = torch.randn(b, *src.input_spec.shape, generator=g)
        ref = src.reference_forward(0, x).numpy()
        got = sess.run(["logits"], {"input": x.numpy()})[0]
        assert got.shape == (b, 3 if src.backbone_name != "mlp" else 4)
        assert np.abs(got - ref).max() <= 1e-4
    # The check is sensitive: the logits are not trivially constant across samples.
    assert np.abs(got[0] - got[1]).max() > 1e-3


def test_sidecar_contents_exact(exported):
    src, out, sidecars = exported
    s = json.loads((out / "task-000.json").read_text())
    assert s == sidecars[0]
    assert tuple(s) == SIDECAR_KEYS
    info = src.task_info(0)
    stats = src.subnetwork_stats(0)
    assert s["format"] == "anpyc.export" and s["version"] == 1
    assert s["task"] == 0 and s["name"] == info["name"]
    assert s["classes"] == info["classes"] and s["num_classes"] == len(info["classes"])
    assert s["file"] == "task-000.onnx"
    assert s["onnx_sha256"] == sha256_file(out / "task-000.onnx")
    assert s["onnx_bytes"] == (out / "task-000.onnx").stat().st_size
    assert s["input_name"] == "input" and s["output_name"] == "logits"
    assert s["input_spec"] == src.input_spec.to_dict()
    assert set(s["input_spec"]) == {"kind", "shape", "mean", "std", "interpolation", "crop_pct", "color_mode"}
    assert s["exporter"] == "dynamo" and s["exporter_fallback_reason"] is None
    assert s["opset"] == export_onnx.onnx_opset(out / "task-000.onnx")
    assert s["params"] == stats["params"] > 0 and s["flops"] == stats["flops"] > 0
    assert s["mask_sha256"] == src.mask_digest(0) and len(s["mask_sha256"]) == 64
    assert s["backbone"] == src.backbone_name
    assert 0 <= s["parity"]["max_abs_diff"] <= 1e-4 and s["parity"]["atol"] == 1e-4
    assert {1, 3} <= set(s["parity"]["batch_sizes"]) and s["parity"]["batch_sizes"] == list(PARITY_BATCH_SIZES)
    assert s["anpyc_version"] == "0.1.0" and s["int8"] is None
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == {"format": "anpyc.export.manifest", "version": 1, "backbone": src.backbone_name,
                        "anpyc_version": "0.1.0",
                        "tasks": [{"id": 0, "name": info["name"], "sidecar": "task-000.json"}]}
    assert _all_files(out) == ["manifest.json", "task-000.json", "task-000.onnx"]


def test_export_all_tasks_in_one_call_and_merge_later(tmp_path):
    src = mlp_source(tasks=3)
    sidecars = export_all(src, tmp_path, tasks=[0, 2])
    assert [s["task"] for s in sidecars] == [0, 2]
    assert [e["id"] for e in json.loads((tmp_path / "manifest.json").read_text())["tasks"]] == [0, 2]
    assert sidecars[0]["classes"] != sidecars[1]["classes"]
    assert sidecars[0]["onnx_sha256"] != sidecars[1]["onnx_sha256"]
    export_task(src, 1, tmp_path)
    assert [e["id"] for e in json.loads((tmp_path / "manifest.json").read_text())["tasks"]] == [0, 1, 2]
    assert load_export(tmp_path).task_ids == [0, 1, 2]


def test_parity_failure_leaves_no_file(tmp_path):
    before = _leftover_temp_dirs()
    out = tmp_path / "export"
    bad = mlp_source(reference_offset=1e-2)  # the reference is deliberately off by 1e-2
    with pytest.raises(ParityError, match=r"differs from the masked reference model by 0\.01"):
        export_task(bad, 0, out)
    assert _all_files(out) == []
    assert _leftover_temp_dirs() == before
    # An existing good export is left untouched by a failed re-export.
    export_task(mlp_source(), 0, out)
    files = {p: (out / p).read_bytes() for p in _all_files(out)}
    with pytest.raises(ParityError):
        export_all(bad, out)
    assert {p: (out / p).read_bytes() for p in _all_files(out)} == files


def test_tolerance_is_enforced_not_just_reported(tmp_path):
    # A 1e-5 offset passes at the default atol but fails at atol=5e-6.
    src = mlp_source(reference_offset=1e-5)
    assert export_task(src, 0, tmp_path / "a")["parity"]["max_abs_diff"] > 5e-6
    with pytest.raises(ParityError, match="by 1e-05"):
        export_task(src, 0, tmp_path / "b", parity_atol=5e-6)
    assert not (tmp_path / "b").exists()


def test_unknown_task_lists_learned_ones(tmp_path):
    with pytest.raises(UnknownTaskError, match=r"task 5 is not a learned task of this run \(learned: \[0, 1\]\)"):
        export_task(mlp_source(tasks=2), 5, tmp_path)
    assert _all_files(tmp_path) == []


def test_head_width_must_match_classes(tmp_path):
    src = mlp_source()
    src._classes[0] = ["a", "b"]  # the head has 4 outputs
    with pytest.raises(ModelError, match=r"expected logits \[1, 2\]"):
        export_task(src, 0, tmp_path)


def test_float64_subnetwork_is_refused(tmp_path):
    src = mlp_source()
    src._modules[0] = src._modules[0].double()
    with pytest.raises(ModelError, match="float64"):
        export_task(src, 0, tmp_path)


def test_other_backbone_in_same_dir_is_refused(tmp_path):
    export_task(mlp_source(), 0, tmp_path)
    other = mlp_source()
    other.backbone_name = "other"
    with pytest.raises(ExportDirError, match="already holds exports of backbone 'mlp'"):
        export_task(other, 0, tmp_path)


@pytest.mark.parametrize("opset", [17, 18])
def test_requested_opset_is_honoured(tmp_path, opset):
    # dynamo exports opset 18+ and silently keeps 18 when down-conversion fails; that counts as a failure, so a
    # requested opset 17 comes from the TorchScript fallback if need be, never a different opset.
    s = export_task(timm_source("test_convnext"), 0, tmp_path, opset=opset)
    assert s["opset"] == opset == export_onnx.onnx_opset(tmp_path / "task-000.onnx")
    assert s["parity"]["max_abs_diff"] <= 1e-4
    assert (s["exporter"] == "dynamo") == (s["exporter_fallback_reason"] is None)


def test_fallback_to_torchscript_is_recorded(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setitem(export_onnx._EXPORTERS, "dynamo", broken)
    s = export_task(mlp_source(), 0, tmp_path)
    assert s["exporter"] == "torchscript"
    assert "dynamo failed: RuntimeError: simulated dynamo failure" in s["exporter_fallback_reason"]
    assert s["parity"]["max_abs_diff"] <= 1e-4
    x = np.random.default_rng(0).standard_normal((3, 20)).astype(np.float32)
    ref = mlp_source().reference_forward(0, torch.from_numpy(x)).numpy()
    assert np.abs(load_export(tmp_path).logits(0, x) - ref).max() <= 1e-4


def test_an_optimiser_that_breaks_the_graph_is_retried_without_it(tmp_path, monkeypatch):
    """The dynamo exporter's optimiser can leave a node reading a value nothing produces (gemma4_vit); the same
    export without the optimiser is kept, still as the dynamo exporter, with parity."""
    real = torch.onnx.export
    calls = []

    def export(*args, optimize=True, **kwargs):
        calls.append(optimize)
        real(*args, optimize=optimize, **kwargs)
        if optimize:  # what the broken optimiser wrote: a node whose input no earlier node produces
            model = onnx.load(args[2])
            model.graph.node.append(onnx.helper.make_node("Relu", ["never_produced"], ["dangling"]))
            onnx.save(model, args[2])

    monkeypatch.setattr(torch.onnx, "export", export)
    s = export_task(mlp_source(), 0, tmp_path)
    assert calls == [True, False]
    assert s["exporter"] == "dynamo" and s["exporter_fallback_reason"] is None
    assert s["parity"]["max_abs_diff"] <= 1e-4


def test_onnx_numeric_mismatch_is_a_parity_error(tmp_path):
    # At atol 1e-9 float32 rounding between torch and onnxruntime already exceeds the tolerance.
    with pytest.raises(ParityError, match="differs from the torch subnetwork by .* with every exporter"):
        export_task(timm_source("test_efficientnet"), 0, tmp_path, parity_atol=1e-9)
    assert _all_files(tmp_path) == []


def test_both_exporters_failing_is_one_clear_error(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("nope")

    monkeypatch.setitem(export_onnx._EXPORTERS, "dynamo", broken)
    monkeypatch.setitem(export_onnx._EXPORTERS, "torchscript", broken)
    with pytest.raises(export_onnx.ExportFailed, match="dynamo: RuntimeError: nope .* torchscript: RuntimeError"):
        export_task(mlp_source(), 0, tmp_path)
    assert _all_files(tmp_path) == []


# --------------------------------------------------------------------------- int8


@pytest.mark.parametrize("name,mode", [("test_resnet", "static"), ("test_vit", "dynamic")])
def test_int8_quantize_and_compare(tmp_path, name, mode):
    src = _source(name)
    export_task(src, 0, tmp_path)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((16, *src.input_spec.shape)).astype(np.float32)
    entry = quantize_task(tmp_path, 0, mode=mode, calibration=calib if mode == "static" else None)
    assert entry["mode"] == mode and entry["file"] == "task-000.int8.onnx"
    assert entry["onnx_sha256"] == sha256_file(tmp_path / "task-000.int8.onnx")
    assert entry["calibration_samples"] == (16 if mode == "static" else 0)
    assert json.loads((tmp_path / "task-000.json").read_text())["int8"] == entry
    ops = {n.op_type for n in onnx.load(str(tmp_path / "task-000.int8.onnx")).graph.node}
    assert ({"QuantizeLinear", "DequantizeLinear"} <= ops) if mode == "static" else ("DynamicQuantizeLinear" in ops)
    assert entry["onnx_bytes"] < 0.6 * (tmp_path / "task-000.onnx").stat().st_size

    x = rng.standard_normal((32, *src.input_spec.shape)).astype(np.float32)
    fp32_top1 = load_export(tmp_path).logits(0, x).argmax(1)
    r = compare_int8(tmp_path, 0, x, labels=fp32_top1, threads=1, repeats=3, record=True, note="random")
    assert r["samples"] == 32 and r["accuracy_fp32"] == 1.0
    assert r["accuracy_int8"] == r["top1_agreement"] >= 0.75
    assert r["accuracy_change"] == pytest.approx(r["top1_agreement"] - 1.0)
    assert 0 < r["max_score_change"] < 0.5
    assert r["latency_ms_fp32"] > 0 and r["latency_ms_int8"] > 0
    assert r["speedup"] == pytest.approx(r["latency_ms_fp32"] / r["latency_ms_int8"])
    assert json.loads((tmp_path / "task-000.json").read_text())["int8"]["evaluation"] == r
    preds = load_export(tmp_path, int8=True).predict(0, x[:4], top_k=2)
    assert len(preds) == 4 and all(len(p) == 2 for p in preds)


def test_int8_static_needs_calibration_and_tampering_is_caught(tmp_path):
    export_task(mlp_source(), 0, tmp_path)
    with pytest.raises(Exception, match="needs calibration inputs"):
        quantize_task(tmp_path, 0, mode="static")
    with pytest.raises(ExportDirError, match="task 0 has no int8 model"):
        load_export(tmp_path, int8=True).predict(0, np.zeros((1, 20), np.float32))
    quantize_task(tmp_path, 0, mode="dynamic")
    with open(tmp_path / "task-000.int8.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ExportDirError, match="task-000.int8.onnx does not match its sidecar"):
        load_export(tmp_path)


# --------------------------------------------------------------------------- CLI: anpyc export


def _patch_learner_load(monkeypatch, source) -> None:
    """Make ``ContinualLearner.load`` return ``source`` (a stand-in module while anpyc.learner is being written)."""
    try:
        import anpyc.learner as learner_mod
    except ModuleNotFoundError as e:
        if e.name != "anpyc.learner":
            raise
        learner_mod = types.ModuleType("anpyc.learner")
        learner_mod.ContinualLearner = type("ContinualLearner", (), {})
        monkeypatch.setitem(sys.modules, "anpyc.learner", learner_mod)
    monkeypatch.setattr(learner_mod.ContinualLearner, "load", staticmethod(lambda run_dir: source), raising=False)


def test_cli_export_with_stand_in_learner(tmp_path, monkeypatch):
    from anpyc.cli.app import app

    run = tmp_path / "run"
    run.mkdir()
    _patch_learner_load(monkeypatch, mlp_source(tasks=2))
    runner = CliRunner(env={"COLUMNS": "200"})
    r = runner.invoke(app, ["export", str(run), "--task", "1", "--int8"])
    assert r.exit_code == 0, r.output
    assert "task 1 'task1'" in r.stdout and "exporter=dynamo" in r.stdout and "int8 (dynamic" in r.stdout
    assert _all_files(run / "export") == ["manifest.json", "task-001.int8.onnx", "task-001.json", "task-001.onnx"]

    r = runner.invoke(app, ["export", str(run), "--all", "--out", str(tmp_path / "all")])
    assert r.exit_code == 0, r.output
    assert load_export(tmp_path / "all").task_ids == [0, 1]

    r = runner.invoke(app, ["export", str(run), "--task", "0", "--all"])
    assert r.exit_code == 2 and "either --task N or --all" in _flat(r.output)

    r = runner.invoke(app, ["export", str(run), "--task", "9"])
    assert r.exit_code == 2
    assert r.stderr.strip() == ("error: task 9 is not a learned task of this run (learned: [0, 1]) "
                                "(pass one of the learned task ids, or --all)")

    _patch_learner_load(monkeypatch, mlp_source(reference_offset=1e-2))
    r = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "error: task 0: the pruned subnetwork differs" in r.stderr
    assert not (tmp_path / "bad").exists()

    r = runner.invoke(app, ["export", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "does not exist" in _flat(r.output)


def test_cli_export_real_learner_run(tmp_path):
    """The real learner: a 2-task pruned test_resnet run, exported through the CLI, parity vs the learner."""
    import anpyc.learner as learner_mod
    run = _tiny_real_run(learner_mod, tmp_path / "run")
    from anpyc.cli.app import app

    r = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["export", str(run), "--all", "--int8"])
    assert r.exit_code == 0, r.output
    learner = learner_mod.ContinualLearner.load(run)
    models = load_export(run / "export")
    assert models.task_ids == learner.task_ids() == [0, 1]
    g = torch.Generator().manual_seed(0)
    for t in learner.task_ids():
        s = models.sidecar(t)
        assert s["mask_sha256"] == learner.mask_digest(t)
        assert s["params"] == learner.subnetwork_stats(t)["params"]
        assert s["params"] < sum(p.numel() for p in learner.trunk.parameters())  # units were physically removed
        assert s["classes"] == ["a", "b"] and s["backbone"] == "test_resnet"
        for b in (1, 3):
            x = torch.randn(b, *learner.input_spec.shape, generator=g)
            assert np.abs(models.logits(t, x.numpy()) - learner.reference_forward(t, x).numpy()).max() <= 1e-4
    assert load_export(run / "export", int8=True).predict(1, np.zeros((2, 3, 32, 32), np.float32))[0][0]["label"] in "ab"


def _tiny_real_run(learner_mod, run_dir: Path) -> Path:
    from torch.utils.data import TensorDataset

    from anpyc.configure import method_config
    from anpyc.task import Task

    g = torch.Generator().manual_seed(0)

    def data(n: int) -> TensorDataset:
        return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 2, (n,), generator=g))

    # One schedule prune step per task keeps this at ~15 s on 2 cores while still removing units.
    cfg = method_config("anpyc", **{"prune.mode": "schedule", "prune.step": 0.25, "prune.first_ratio": 0.25,
                                    "optim.epochs": 1, "optim.batch_size": 16, "importance.max_batches": 2,
                                    "prune.retrain_epochs": 1, "threads": 2})
    learner = learner_mod.ContinualLearner("test_resnet", input_size=(3, 32, 32), out_dir=run_dir, config=cfg)
    for t in range(2):
        learner.learn(Task(t, f"task{t}", ("a", "b"), data(32), val=data(16), test=data(16)), final=t == 1)
    return run_dir


def test_parity_tolerance_follows_the_logits_scale(tmp_path):
    """float32 rounding grows with the values: the tolerance is atol times the largest |logit| (at least 1), as in
    the walk. Logits near 1000 may differ by 2e-3 (2e-6 of their scale); logits near 1 may not (mobileone_s0's
    logits reach 47 and its correct exports differed by 3.9e-4, refused under a fixed 1e-4)."""
    big = mlp_source(reference_offset=2e-3)
    with torch.no_grad():
        head = big._modules[0][-1]
        head.weight.mul_(1000.0)
        head.bias.mul_(1000.0)
    s = export_task(big, 0, tmp_path / "big")
    assert s["parity"]["output_scale"] > 100 and 1.5e-3 < s["parity"]["max_abs_diff"] <= 1e-4 * s["parity"]["output_scale"]
    small = mlp_source(reference_offset=2e-3)
    with pytest.raises(ParityError, match=r"by 0\.002 \(> atol 0\.0001 x output scale"):
        export_task(small, 0, tmp_path / "small")
    assert not (tmp_path / "small").exists()
