"""Initial weights (``--weights FILE``, ``--pretrained``, ``weights=`` in Python): the trunk starts from exactly the
file's values (init.safetensors holds them), a file that does not fit fails with one line naming its keys and
writes nothing, the run records where its weights came from, and re-opening a run never reads that file or goes
online. Offline throughout: timm's pretrained loader is pointed at a local file."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import anpyc
import anpyc.weights
from anpyc.backbones import build_trunk, is_known, name_from_record
from anpyc.errors import ModelError
from anpyc.task import InputSpec
from anpyc.weights import tensors_sha256

from conftest import fast_config, tiny_stream
from test_bad_inputs import FAST, api_error, intact, invoke, snapshot, user_error

SYNTH = ["--data", "synthetic", "--data-opt", "samples_per_class=8", "--data-opt", "img_size=16"]
SPEC = InputSpec(kind="image", shape=(3, 16, 16))
CLASSIFIER = ("fc.weight", "fc.bias")  # test_resnet's pretrained_cfg["classifier"] is "fc"


def perturbed(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A timm model's full state dict (classifier included), every value moved away from its init."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in timm.create_model(name, pretrained=False).state_dict().items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            out[k] = v * (1.5 + torch.rand(v.shape, generator=g))
        else:
            out[k] = v + 0.1 * torch.randn(v.shape, generator=g)
    return out


def trunk_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k not in CLASSIFIER}


def init_state(run: Path) -> dict[str, torch.Tensor]:
    """init.safetensors as one state dict (parameters by name, buffers under buffer/)."""
    return {k.removeprefix("buffer/"): v for k, v in load_file(run / "init.safetensors").items()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("weights")
    state = perturbed("test_resnet")
    save_file(state, d / "resnet.safetensors")
    # a training checkpoint: the state dict under "state_dict", saved from DDP (module. prefix), plus metadata
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, d / "resnet.pth")
    save_file(perturbed("test_efficientnet"), d / "efficientnet.safetensors")
    return {"dir": d, "safetensors": d / "resnet.safetensors", "pth": d / "resnet.pth",
            "wrong": d / "efficientnet.safetensors"}


@pytest.fixture(scope="module")
def state(files) -> dict[str, torch.Tensor]:
    return load_file(files["safetensors"])


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory) -> tuple[Path, Path, object]:
    """One task trained from a copy of the safetensors file (the copy is deleted by the resume test)."""
    d = tmp_path_factory.mktemp("trained")
    weights = d / "copy.safetensors"
    shutil.copy(files["safetensors"], weights)
    run = d / "run"
    r = invoke("train", "--model", "test_resnet", *SYNTH, "--tasks", "1", "--out", run, "--weights", weights, *FAST)
    return run, weights, r


# ------------------------------------------------------------------------------------------------ from a file

def test_train_starts_from_the_file_values(trained, files, state):
    run, weights, r = trained
    assert r.exit_code == 0, r.output
    digest = hashlib.sha256(files["safetensors"].read_bytes()).hexdigest()
    out = " ".join(r.stdout.split())
    assert f"weights: file copy.safetensors (sha256 {digest[:12]}...), 90 tensors, classifier fc.* ignored" in out
    assert_same(init_state(run), trunk_part(state))
    backbone = json.loads((run / "run.json").read_text())["backbone"]
    assert backbone["name"] == "test_resnet" and backbone["kwargs"] == {}
    assert backbone["weights"] == {"source": "file", "path": str(weights.resolve()), "sha256": digest,
                                   "bytes": files["safetensors"].stat().st_size, "key": None, "tensors": 90,
                                   "ignored": ["fc.bias", "fc.weight"], "adapted": []}
    r = invoke("inspect", run, "--no-groups")
    assert r.exit_code == 0 and f"weights: file copy.safetensors (sha256 {digest[:12]}" in " ".join(r.stdout.split())


def test_a_torch_checkpoint_from_a_config_file(files, state, tmp_path):
    """A .pth training checkpoint (state dict under "state_dict", DDP prefix), named by a config file relative to
    its folder, loads the same values as the safetensors file."""
    cfg = files["dir"] / "exp.toml"
    cfg.write_text('[model]\nname = "test_resnet"\nweights = "resnet.pth"\n')
    run = tmp_path / "run"
    r = invoke("train", "--config", cfg, *SYNTH, "--tasks", "1", "--out", run, *FAST)
    assert r.exit_code == 0, r.output
    assert "'state_dict' of the checkpoint, 90 tensors" in " ".join(r.stdout.split())
    assert_same(init_state(run), trunk_part(state))
    weights = json.loads((run / "run.json").read_text())["backbone"]["weights"]
    assert weights["path"] == str(files["pth"].resolve()) and weights["key"] == "state_dict"
    assert weights["sha256"] == hashlib.sha256(files["pth"].read_bytes()).hexdigest()


def test_the_wrong_architecture_fails_cleanly_and_writes_nothing(files, tmp_path):
    out = tmp_path / "run"
    line = user_error(invoke("train", "--model", "test_resnet", *SYNTH, "--out", out, "--weights", files["wrong"],
                             *FAST), "does not fit test_resnet", "missing (conv1.0.weight", "unexpected (",
                      "same architecture")
    assert "conv_stem.weight" in line or "blocks." in line, line  # test_efficientnet's own keys are named
    assert not out.exists()


def test_each_kind_of_mismatch_names_its_keys(state, tmp_path):
    def fails(mutate, *needles):
        bad = dict(state)
        mutate(bad)
        path = tmp_path / "bad.safetensors"
        save_file(bad, path)
        with pytest.raises(ModelError) as e:
            build_trunk("test_resnet", SPEC, None, weights=path)
        api_error(e.value, *needles)

    fails(lambda s: s.update({"layer1.0.conv1.weight": torch.zeros(4, 4, 3, 3)}),
          "1 of another shape (layer1.0.conv1.weight; layer1.0.conv1.weight is [4, 4, 3, 3] in the file")
    fails(lambda s: s.pop("layer2.0.bn1.weight"), "1 missing (layer2.0.bn1.weight)")
    fails(lambda s: s.update({"extra.weight": torch.ones(2), "extra.bias": torch.ones(2)}),
          "2 unexpected (extra.bias, extra.weight)")
    fails(lambda s: s.update({"conv1.0.weight": torch.full_like(s["conv1.0.weight"], float("nan"))}),
          "non-finite values in conv1.0.weight")


def test_files_that_are_not_state_dicts_fail_cleanly(state, tmp_path):
    """weights_only=True refuses objects (an argparse Namespace in a checkpoint); entries that are not tensors, a
    list and a corrupt safetensors file are one-line errors too."""
    cases = {
        "objects.pth": ({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, "weights_only=True"),
        "mixed.pth": ({**state, "note": "best"}, "entry 'note' that is a str, not a tensor"),
        "list.pth": ([state["fc.bias"]], "holds a list, not a state dict"),
        "nested.pth": ({"optimizer": {}, "epoch": 3}, "holds no state dict (top-level keys: 'optimizer', 'epoch')"),
    }
    for name, (obj, needle) in cases.items():
        torch.save(obj, tmp_path / name)
        out = tmp_path / f"run-{name}"
        user_error(invoke("train", "--model", "test_resnet", *SYNTH, "--out", out, "--weights", tmp_path / name,
                          *FAST), needle)
        assert not out.exists(), name
    (tmp_path / "torn.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    user_error(invoke("train", "--model", "test_resnet", *SYNTH, "--out", tmp_path / "x", "--weights",
                      tmp_path / "torn.safetensors", *FAST), "is not a readable safetensors file")


def test_an_rgb_stem_is_adapted_to_grey_inputs(state, files):
    """timm's own adaptation (what pretrained=True does): RGB stem weights summed for a one-channel trunk."""
    trunk, record = build_trunk("test_resnet", InputSpec(kind="image", shape=(1, 16, 16)), None,
                                weights=files["safetensors"])
    got = trunk.state_dict()
    assert torch.allclose(got["conv1.0.weight"], state["conv1.0.weight"].sum(dim=1, keepdim=True))
    assert record["weights"]["adapted"] == ["conv1.0.weight"]
    assert all(torch.equal(got[k], state[k]) for k in got if k != "conv1.0.weight")


def test_resume_needs_no_weights_file(trained, tmp_path):
    run, weights, r = trained
    assert r.exit_code == 0, r.output
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights.unlink()
    r = invoke("train", "--resume", "--out", copy, "--tasks", "2", "--no-progress", "--no-plots")
    assert r.exit_code == 0, r.output
    assert "resuming: 1 of 2" in " ".join(r.stdout.split()) and "task 1 synthetic 1 done" in " ".join(r.stdout.split())
    before = json.loads((run / "run.json").read_text())["backbone"]
    assert json.loads((copy / "run.json").read_text())["backbone"] == before  # the record is kept, informational
    assert not weights.exists()


def test_a_run_that_had_not_committed_restarts_from_the_loaded_values(files, state, tmp_path):
    """Before its first commit a run's trunk is only in init.safetensors: resuming restores it (parameters and
    BatchNorm statistics), not the backbone's random init, and the deleted file is not needed."""
    weights = tmp_path / "w.safetensors"
    shutil.copy(files["safetensors"], weights)
    stream = tiny_stream("test_resnet", num_tasks=1, samples_per_class=8)
    learner = anpyc.ContinualLearner("test_resnet", input_spec=stream.input_spec, out_dir=tmp_path / "run",
                                     config=fast_config(), weights=weights)
    learner.close()
    weights.unlink()
    learner = anpyc.ContinualLearner.resume(tmp_path / "run")
    with learner:
        assert learner.backbone["weights"]["source"] == "file"
        assert_same({k: v.cpu() for k, v in learner.trunk.state_dict().items()}, trunk_part(state))
        assert all(torch.equal(learner.state.init.stats[k].cpu(), state[k]) for k in learner.state.init.stats)
        learner.learn(stream[0])
        assert learner.task_ids() == [0]


# ------------------------------------------------------------------------------------------------ pretrained

@pytest.fixture
def local_hub(monkeypatch, files):
    """timm's pretrained loader pointed at the local safetensors file; every create_model call is recorded."""
    calls = []
    real = timm.create_model

    def create_model(name, pretrained=False, **kw):
        calls.append({"name": name, "pretrained": pretrained, **{k: kw[k] for k in ("num_classes",) if k in kw}})
        if pretrained:
            kw["pretrained_cfg_overlay"] = {"file": str(files["safetensors"])}
        return real(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(timm, "create_model", create_model)
    monkeypatch.setattr(anpyc.weights, "reachable", lambda *a, **k: True)  # "online": the overlay reads the file
    return calls


def test_pretrained_loads_timm_weights_and_records_them(local_hub, files, state, tmp_path):
    run = tmp_path / "run"
    r = invoke("train", "--model", "test_resnet", "--pretrained", *SYNTH, "--tasks", "1", "--out", run, *FAST)
    assert r.exit_code == 0, r.output
    assert {"name": "test_resnet", "pretrained": True, "num_classes": 0} in local_hub
    assert_same(init_state(run), trunk_part(state))
    backbone = json.loads((run / "run.json").read_text())["backbone"]
    digest = tensors_sha256(trunk_part(state))
    assert backbone == {"source": "name", "name": "test_resnet", "kwargs": {},
                        "weights": {"source": "pretrained", "name": "test_resnet", "tag": "r160_in1k",
                                    "file": str(files["safetensors"]), "tensors": 90, "tensors_sha256": digest}}
    assert f"weights: pretrained test_resnet from file {files['safetensors']} (tensors sha256 {digest[:12]}" \
        in " ".join(r.stdout.split())
    local_hub.clear()
    r = invoke("eval", run)  # re-opening builds the architecture only: never pretrained again
    assert r.exit_code == 0, r.output
    assert local_hub and not any(c["pretrained"] for c in local_hub)


def test_pretrained_failures_are_one_line(monkeypatch, tmp_path):
    def offline(name, pretrained=False, **kw):
        raise OSError("An error happened while trying to locate the file on the Hub\nsecond line")

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(anpyc.weights, "reachable", lambda *a, **k: True)  # the hub answers, then the load fails
    out = tmp_path / "run"
    user_error(invoke("train", "--model", "test_resnet", "--pretrained", *SYNTH, "--out", out, *FAST),
               "cannot load the pretrained weights of 'test_resnet' (OSError: An error happened", "--weights FILE")
    monkeypatch.undo()
    user_error(invoke("train", "--model", "cnn", "--pretrained", *SYNTH, "--out", out, *FAST),
               "anpyc's own backbone 'cnn' has no pretrained weights")
    assert not out.exists()
    with pytest.raises(ModelError) as e:
        build_trunk(timm.create_model("test_resnet"), SPEC, None, weights="pretrained")
    api_error(e.value, "needs a model name")


def test_hub_names_pass_to_timm_and_runs_record_the_architecture(monkeypatch, state):
    """``hf-hub:`` names go to timm unchanged; the record names the timm architecture (with the hub config's
    arguments), so re-opening the run builds it without the hub."""
    import timm.models._builder as builder
    import timm.models._factory as factory

    if not (hasattr(factory, "load_model_config_from_hf") and hasattr(builder, "load_state_dict_from_hf")):
        pytest.skip("this timm resolves hub models elsewhere")
    asked = []

    def config_from_hf(model_id, cache_dir=None):
        asked.append(("config", model_id))
        cfg = timm.models.get_pretrained_cfg("test_resnet").to_dict()
        cfg.update(hf_hub_id=model_id, source="hf-hub")
        return cfg, "test_resnet", {"num_classes": 5, "drop_rate": 0.25}

    def weights_from_hf(model_id, *a, **kw):
        asked.append(("weights", model_id))
        return dict(state)

    monkeypatch.setattr(factory, "load_model_config_from_hf", config_from_hf)
    monkeypatch.setattr(builder, "load_state_dict_from_hf", weights_from_hf)
    monkeypatch.setattr(anpyc.weights, "reachable", lambda *a, **k: True)  # the (mocked) hub answers
    trunk, record = build_trunk("hf-hub:someone/tiny-resnet", SPEC, None, weights="pretrained")
    # the config may be asked twice (once with img_size, which a ResNet refuses); the weights load once
    assert set(asked) == {("config", "someone/tiny-resnet"), ("weights", "someone/tiny-resnet")}
    assert asked.count(("weights", "someone/tiny-resnet")) == 1
    assert_same(trunk.state_dict(), trunk_part(state))
    assert record["name"] == "test_resnet" and record["kwargs"] == {"drop_rate": 0.25}
    assert record["hub"] == "hf-hub:someone/tiny-resnet" and record["weights"]["hub_id"] == "someone/tiny-resnet"
    asked.clear()
    assert name_from_record(record, "run x") == ("test_resnet", {"drop_rate": 0.25})
    assert is_known("hf-hub:someone/other") and asked == []  # by its form: the hub is not asked


# ------------------------------------------------------------------------------------------------ run files

class Watch:
    """Every file opened and every socket connected while active (a Python audit hook; hooks cannot be removed,
    so one is installed per process and switched on and off)."""

    active: "Watch | None" = None
    installed = False

    def __init__(self):
        self.opened: list[str] = []
        self.connected: list[str] = []
        if not Watch.installed:
            sys.addaudithook(Watch._hook)
            Watch.installed = True

    @staticmethod
    def _hook(event, args):
        w = Watch.active
        if w is None:
            return
        if event == "open" and args and isinstance(args[0], (str, bytes, Path)):
            w.opened.append(str(args[0]))
        elif event == "socket.connect":
            w.connected.append(str(args[1:]))

    def __enter__(self):
        Watch.active = self
        return self

    def __exit__(self, *exc):
        Watch.active = None


def test_a_weights_record_read_from_run_json_is_never_acted_on(trained, tmp_path):
    """A crafted run.json whose weights (and hub) name a file and a hub model: eval, resume and load open the run
    without reading that file or connecting anywhere."""
    run, _, r = trained
    assert r.exit_code == 0, r.output
    secret = tmp_path / "secret.safetensors"
    shutil.copy(run / "init.safetensors", secret)
    crafted = tmp_path / "crafted"
    shutil.copytree(run, crafted)
    doc = json.loads((crafted / "run.json").read_text())
    doc["backbone"]["weights"] = {"source": "file", "path": str(secret), "sha256": "0" * 64, "hub_id": "evil/x",
                                  "url": "https://example.invalid/w.pth"}
    doc["backbone"]["hub"] = "hf-hub:evil/x"
    (crafted / "run.json").write_text(json.dumps(doc))
    with Watch() as w:
        assert invoke("eval", crafted).exit_code == 0
        r = invoke("train", "--resume", "--out", crafted, "--no-progress", "--no-plots")
        assert r.exit_code == 0, r.output
        anpyc.ContinualLearner.load(crafted)
    assert w.opened, "the watch saw nothing"
    assert not [p for p in w.opened if Path(p).name == secret.name], "the weights file named by run.json was read"
    assert w.connected == []


def test_a_record_naming_a_hub_model_is_refused_offline(trained, tmp_path):
    run, _, r = trained
    assert r.exit_code == 0, r.output
    crafted = tmp_path / "crafted"
    shutil.copytree(run, crafted)
    (crafted / "run.lock").unlink(missing_ok=True)
    doc = json.loads((crafted / "run.json").read_text())
    doc["backbone"] = {"source": "name", "name": "hf-hub:evil/tiny", "kwargs": {}}
    (crafted / "run.json").write_text(json.dumps(doc))
    before = snapshot(crafted)
    with Watch() as w:
        user_error(invoke("eval", crafted), "names the hub model 'hf-hub:evil/tiny'", "never goes online")
    assert w.connected == []
    intact(before)


# ------------------------------------------------------------------------------------------------ the CLI

def test_weight_flags_and_config_keys(files, tmp_path):
    out = tmp_path / "run"
    r = invoke("train", "--model", "test_resnet", *SYNTH, "--out", out, "--pretrained", "--weights",
               files["safetensors"])
    assert r.exit_code == 2 and "not both" in " ".join(r.output.split())
    cfg = tmp_path / "both.toml"
    cfg.write_text('[model]\nname = "test_resnet"\npretrained = true\nweights = "w.safetensors"\n')
    user_error(invoke("train", "--config", cfg, *SYNTH, "--out", out), "'model.pretrained' and 'model.weights'")
    cfg.write_text('[model]\nname = "test_resnet"\npretrained = "yes"\n')
    user_error(invoke("train", "--config", cfg, *SYNTH, "--out", out), "'model.pretrained' must be true or false")
    cfg.write_text('[model]\nname = "test_resnet"\nweights = "nowhere.safetensors"\n')
    user_error(invoke("train", "--config", cfg, *SYNTH, "--out", out), f"{tmp_path / 'nowhere.safetensors'}",
               "does not exist")
    assert not out.exists()
    r = invoke("train", "--model", "test_resnet", *SYNTH, "--out", out, "--weights", tmp_path / "missing.pth")
    assert r.exit_code == 2 and "does not exist" in " ".join(r.output.split())
    # model options cannot load weights; the flags can
    user_error(invoke("train", "--model", "test_resnet", *SYNTH, "--out", out, "--model-opt", "pretrained=true"),
               "would load weights", "--pretrained or --weights FILE")


def test_resume_refuses_weight_flags(trained, files):
    run, _, r = trained
    assert r.exit_code == 0, r.output
    for flags in (["--pretrained"], ["--weights", files["safetensors"]]):
        r = invoke("train", "--resume", "--out", run, *flags)
        assert r.exit_code == 2 and "keeps the configuration" in " ".join(r.output.split())
        assert flags[0] in " ".join(r.output.split())


def test_no_pretrained_overrides_the_config_file(local_hub, tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text('[model]\nname = "test_resnet"\npretrained = true\n')
    run = tmp_path / "run"
    r = invoke("train", "--config", cfg, "--no-pretrained", *SYNTH, "--tasks", "1", "--out", run, *FAST)
    assert r.exit_code == 0, r.output
    assert "weights" not in json.loads((run / "run.json").read_text())["backbone"]
    assert not any(c["pretrained"] for c in local_hub)
