"""No file anpyc reads may choose code: a run directory that names a ``module:function`` (or weights to load) is
refused with a one-line error, a non-zero exit, nothing imported and nothing in the directory touched."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

import anpyc
from anpyc.errors import RunDirError

from test_bad_inputs import FAST, SYNTH, api_error, intact, invoke, snapshot, user_error

PAYLOAD = "anpyc_test_payload"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("files") / "run"
    r = invoke("train", "--model", "cnn", "--model-opt", "width=4", *SYNTH, "--tasks", "1", "--out", run, *FAST)
    assert r.exit_code == 0, r.output
    return run


@pytest.fixture
def payload(tmp_path, monkeypatch) -> Path:
    """An importable module whose import (or call) leaves a file behind: proof that code ran."""
    sentinel = tmp_path / "payload-ran"
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / f"{PAYLOAD}.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('imported')\n"
        "def make(*a, **k):\n"
        f"    open({str(sentinel)!r}, 'w').write('called')\n"
        "    raise SystemExit(0)\n")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("PYTHONPATH", str(pkg))
    sys.modules.pop(PAYLOAD, None)
    return sentinel


def _crafted(trained: Path, tmp_path: Path, backbone: dict, *, version: int | None = None) -> Path:
    run = tmp_path / "crafted"
    shutil.copytree(trained, run)
    (run / "run.lock").unlink(missing_ok=True)
    (run / ".leftover.tmp").write_text("debris a real open would clean up")
    doc = json.loads((run / "run.json").read_text())
    doc["backbone"] = backbone
    if version is not None:
        doc["version"] = version
    (run / "run.json").write_text(json.dumps(doc))
    return run


CODE_RECORDS = {
    "v1 factory": ({"factory": f"{PAYLOAD}:make", "name": "cnn", "kwargs": {"width": 4}}, 1),
    "v2 source": ({"source": f"{PAYLOAD}:make", "name": "cnn", "kwargs": {"width": 4}}, None),
    "name is code": ({"source": "name", "name": f"{PAYLOAD}:make", "kwargs": {}}, None),
}


@pytest.mark.parametrize("case", sorted(CODE_RECORDS))
@pytest.mark.parametrize("command", ["eval", "export", "resume"])
def test_cli_refuses_a_run_that_names_code(trained, tmp_path, payload, case, command):
    record, version = CODE_RECORDS[case]
    run = _crafted(trained, tmp_path, record, version=version)
    before = snapshot(run)
    args = {"eval": ("eval", run), "export": ("export", run, "--out", tmp_path / "exp"),
            "resume": ("train", "--out", run, "--resume", "--no-progress", "--no-plots")}[command]
    line = user_error(invoke(*args))
    assert "code" in line or "not a model name" in line, line
    assert not payload.exists(), "the payload ran"
    assert PAYLOAD not in sys.modules
    intact(before)
    assert not (run / "run.lock").exists() and (run / ".leftover.tmp").exists()  # not opened for writing
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("opener", ["load", "resume"])
def test_api_refuses_a_run_that_names_code(trained, tmp_path, payload, opener):
    record, version = CODE_RECORDS["v1 factory"]
    run = _crafted(trained, tmp_path, record, version=version)
    before = snapshot(run)
    with pytest.raises(RunDirError) as e:
        getattr(anpyc.ContinualLearner, opener)(run)
    api_error(e.value, "anpyc_test_payload:make", "never from code", "model=")
    assert not payload.exists() and PAYLOAD not in sys.modules
    intact(before)


def test_run_options_cannot_load_weights(trained, tmp_path):
    """Options that make a model load a file or fetch weights are refused when read from run.json."""
    run = _crafted(trained, tmp_path, {"source": "name", "name": "resnet18",
                                       "kwargs": {"pretrained": True, "pretrained_cfg_overlay": {"file": "/x"}}})
    before = snapshot(run)
    line = user_error(invoke("eval", run))
    assert "pretrained" in line and "would load weights" in line
    intact(before)


def test_version_1_runs_still_open(trained, tmp_path):
    """The one factory string version 1 wrote for every named backbone is read as the name it built."""
    run = _crafted(trained, tmp_path, {"factory": "anpyc.adapters.backbones:create_backbone", "name": "cnn",
                                       "kwargs": {"width": 4}}, version=1)
    learner = anpyc.ContinualLearner.load(run)
    assert learner.backbone_name == "cnn" and learner.task_ids() == [0]
    r = invoke("eval", run)
    assert r.exit_code == 0, r.output


def test_new_runs_record_a_name_not_code(trained):
    doc = json.loads((trained / "run.json").read_text())
    assert doc["version"] == 3
    assert doc["backbone"] == {"source": "name", "name": "cnn", "kwargs": {"width": 4}}
    assert "factory" not in doc["backbone"]
