"""The benchmark scripts run end to end on tiny settings (--quick) and write tables whose numbers make sense."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    sys.path.insert(0, str(BENCH))
    spec.loader.exec_module(module)
    return module


def _rows(markdown: str, section: str) -> dict[str, list[str]]:
    """First table cell -> cells, for every table row inside ``section``'s markers."""
    body = markdown.split(f"<!-- {section}:begin -->")[1].split(f"<!-- {section}:end -->")[0]
    rows = {}
    for line in body.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault(cells[0], cells)
    return rows


def _num(cell: str) -> float:
    return float(re.match(r"[+-]?\d+(\.\d+)?", cell).group(0))


def test_forgetting_quick_writes_its_table(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n<!-- other:begin -->\nkept\n<!-- other:end -->\n")
    forgetting = _load("forgetting")
    methods = ["anpyc", "anpyc-element", "paper", "finetune", "packnet", "ewc", "joint"]
    assert forgetting.main(["--quick", "--seeds", "0", "--suites", "permuted10", "--methods", ",".join(methods),
                            "--out", str(out), "--threads", "1"]) == 0
    text = out.read_text()
    assert "<!-- other:begin -->\nkept\n<!-- other:end -->" in text  # other sections untouched
    assert "python benchmarks/forgetting.py --quick --suites permuted10 --seeds 0 --threads 1 --methods" in text
    rows = _rows(text, "forgetting")
    for m in methods:
        acc, bwt, cap = _num(rows[m][2]), _num(rows[m][3]), _num(rows[m][5])
        assert 0.0 < acc <= 100.0 and 0.0 < cap <= 100.0, rows[m]
    # hard ownership: earlier tasks cannot move
    assert _num(rows["anpyc"][3]) == 0.0 and _num(rows["packnet"][3]) == 0.0 and _num(rows["anpyc-element"][3]) == 0.0
    # the method issue's targets are stated for the default, computed from the rows
    doc = json.loads((tmp_path / "benchmarks/results/forgetting_permuted10_quick.json").read_text())
    acc = {m: np.mean([r["acc"] for r in doc["rows"][m]]) for m in ("anpyc", "packnet")}
    gap = 100 * (acc["anpyc"] - acc["packnet"])
    assert f"Targets for the default `anpyc`: ACC − PackNet = {gap:+.2f} pts (target ≥ +0.5: " \
           f"{'met' if gap >= 0.5 - 1e-9 else 'missed'}); ACC − anpyc-element = " in text
    assert re.search(r"wall \d+\.\d\dx PackNet's \(target ≤ 1\.5x: (met|missed)\); \d+\.\d\dx fine-tuning's", text)
    # fine-tuning shares every unit; the default grows instead of leaving units unused, but every task's subnetwork
    # is smaller than the (grown) dense model, and anpyc-element leaves capacity free
    assert _num(rows["finetune"][5]) == 100.0 and _num(rows["anpyc-element"][5]) < 100.0
    assert _num(rows["anpyc"][6]) < 100.0
    doc = json.loads((tmp_path / "benchmarks/results/forgetting_permuted10_quick.json").read_text())
    run = doc["rows"]["anpyc"][0]
    assert len(run["accuracy_matrix"]) == 3 and len(run["val_accuracy_matrix"][-1]) == 3
    assert run["test_acc_curve"][-1] == pytest.approx(run["acc"])
    assert (tmp_path / "benchmarks/results/acc_vs_tasks_permuted10_quick.png").stat().st_size > 10_000


def test_forgetting_quick_search_and_cnn_suite(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    forgetting, suites = _load("forgetting"), _load("suites")
    assert forgetting.main(["--quick", "--seeds", "0", "--suites", "permuted10", "--search", "--methods", "packnet",
                            "--out", str(out), "--cache", str(tmp_path / "cache")]) == 0
    assert forgetting.main(["--quick", "--seeds", "0", "--suites", "split-digits", "--methods", "anpyc",
                            "--out", str(out)]) == 0
    text = out.read_text()
    search = [line for line in text.splitlines() if line.startswith("| packnet | `prune.first_ratio=")]
    assert len(search) == len(suites.grid(suites.SEARCH["permuted10"]["packnet"]))
    assert sum("**winner**" in line for line in search) == 1
    rows = _rows(text, "forgetting")
    assert rows["anpyc"][1] == "test_resnet" and _num(rows["anpyc"][3]) == 0.0
    assert len(list((tmp_path / "cache" / "permuted10").glob("packnet-s0-*.json"))) == len(search)


def test_overhead_quick_writes_its_table(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    overhead = _load("overhead")
    assert overhead.main(["--quick", "--models", "mlp", "--out", str(out), "--threads", "1"]) == 0
    text = out.read_text()
    assert "python benchmarks/overhead.py --quick --models mlp" in text
    rows = _rows(text, "overhead")
    for v in ("plain", "finetune", "anpyc", "anpyc-soft", "paper"):
        ms, ratio = _num(rows[v][1]), _num(rows[v][2])
        assert ms > 0 and ratio > 0, rows[v]
    assert _num(rows["plain"][2]) == 1.0
    doc = json.loads((tmp_path / "benchmarks/results/overhead_quick.json").read_text())
    masks = doc["models"]["mlp"]["masks"]
    assert masks["anpyc"]["owner_bytes"] == masks["anpyc"]["units"]  # one byte per unit for every task together
    paper = masks["paper"]["files"][1]
    assert 1.0 <= paper["per_unit"] < 1.1  # element masks: one byte per weight element plus a small header
    assert 0 < doc["models"]["mlp"]["importance"]["ratio"]
    worst = max(r["per_unit"] for r in masks["anpyc"]["files"])
    ratio = doc["models"]["mlp"]["step"]["retrain"]["ratio_vs_finetune"]["anpyc"]
    verdict = "met" if ratio <= 1.15 else f"missed by {ratio - 1.15:.2f}x"
    assert f"retrain phase {ratio:.2f}x ({verdict})" in text
    assert f"at most {worst:.2f} up to 254 tasks ({'met' if worst <= 2 else 'missed'})" in text


def test_routing_quick_writes_its_table(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n<!-- other:begin -->\nkept\n<!-- other:end -->\n")
    routing = _load("routing")
    assert routing.main(["--quick", "--suites", "split-digits", "--out", str(out), "--threads", "1"]) == 0
    text = out.read_text()
    assert "<!-- other:begin -->\nkept\n<!-- other:end -->" in text
    assert "python benchmarks/routing.py --quick --suites split-digits --seeds 0 --threads 1" in text
    doc = json.loads((tmp_path / "benchmarks/results/routing_quick.json").read_text())
    r = doc["suites"][0]
    rows = _rows(text, "routing")
    assert [k for k in rows if ": " in k] == [f"{t['task']}: {t['name']}" for t in r["tasks"]]
    for t in r["tasks"]:
        row = rows[f"{t['task']}: {t['name']}"]
        assert int(row[1]) == t["images"] > 0
        assert _num(row[2]) == pytest.approx(100 * t["routed_own"], abs=0.05)
        assert _num(row[3]) == pytest.approx(100 * t["acc_known"], abs=0.05)
        assert 0.0 <= _num(row[4]) <= _num(row[2])  # right task and right class: at most the right task
    assert int(rows["overall"][1]) == r["images"] == sum(t["images"] for t in r["tasks"])
    assert sum(map(sum, r["confusion"])) == r["images"]
    assert [row[t["task"]] for row, t in zip(r["confusion"], r["tasks"])] == [
        round(t["routed_own"] * t["images"]) for t in r["tasks"]]
    assert _num(rows["0"][1]) == 100.0  # every answer has confidence >= 0
    assert "**When to trust it:** Routing picks the right task for" in text
    assert "lowest normalised predictive entropy" in text


def test_growth_ablation_and_folder_quick(tmp_path, capsys):
    """The long-stream, ablation and folder benchmarks run end to end and report what their rows measured."""
    growth = _load("growth")
    assert growth.main(["--quick", "--results", str(tmp_path / "g"), "--no-write"]) == 0
    rows = json.loads((tmp_path / "g" / "growth_quick.json").read_text())["rows"]
    assert list(rows) == list(growth.ROWS)
    assert rows["anpyc-fixed"]["num_units"] == 16 <= rows["anpyc"]["num_units"]  # 8-8 stays; growth never shrinks
    n = rows["anpyc"]["num_units"]
    assert growth.widths(rows["anpyc"], [8, 8]) == f"{n // 2}-{n // 2}"
    assert growth.widths(rows["packnet"], [8, 8]) == "8-8"
    assert all(r["bwt"] == 0.0 and len(r["accuracy_matrix"]) == 3 for r in rows.values())
    assert growth.acc_at(rows["anpyc"]["accuracy_matrix"], 3) == pytest.approx(rows["anpyc"]["acc"])
    # a partial run re-runs its rows and keeps the others, saying which run measured each
    doc = json.loads((tmp_path / "g" / "growth_quick.json").read_text())
    doc["row_commits"] = {**doc["row_commits"], "packnet": "0ld0ld0"}
    (tmp_path / "g" / "growth_quick.json").write_text(json.dumps(doc))
    assert growth.main(["--quick", "--methods", "anpyc-fixed", "--results", str(tmp_path / "g"), "--no-write"]) == 0
    again = json.loads((tmp_path / "g" / "growth_quick.json").read_text())
    assert list(again["rows"]) == list(growth.ROWS) and again["rows"]["packnet"] == rows["packnet"]
    assert again["row_commits"]["packnet"] == "0ld0ld0" and again["row_commits"]["anpyc-fixed"] == again["commit"]
    assert again["command"].endswith("--methods " + ",".join(growth.ROWS))
    ablation = _load("ablation")
    assert ablation.main(["--quick", "--methods", "default,no growth", "--results", str(tmp_path / "a"),
                          "--no-write"]) == 0
    rows = json.loads((tmp_path / "a" / "ablation_quick.json").read_text())["rows"]
    assert rows["no growth"][0]["config"]["grow"]["enabled"] is False
    assert rows["default"][0]["config"]["grow"]["enabled"] is True
    assert "| default | 0 |" in ablation.table(rows) and "| 1.00 |" in ablation.table(rows)
    # a partial run with more seeds replaces its rows and keeps the others with their own seeds and commands
    assert ablation.main(["--quick", "--methods", "default", "--seeds", "0,1", "--results", str(tmp_path / "a"),
                          "--no-write"]) == 0
    again = json.loads((tmp_path / "a" / "ablation_quick.json").read_text())
    assert list(again["rows"]) == ["default", "no growth"] and again["rows"]["no growth"] == rows["no growth"]
    assert [r["spec"]["seed"] for r in again["rows"]["default"]] == [0, 1]
    assert again["row_commands"]["no growth"].endswith("--methods 'default,no growth'")
    assert again["row_commands"]["default"].endswith("--seeds 0,1 --quick --methods default")
    assert "| default | 0,1 |" in ablation.table(again["rows"]) and "| no growth | 0 |" in ablation.table(again["rows"])
    # --render-only rewrites the section from the results file alone: both runs' commands, both rows, no training
    capsys.readouterr()
    assert ablation.main(["--quick", "--render-only", "--results", str(tmp_path / "a"), "--no-write"]) == 0
    shown = capsys.readouterr().out
    assert again["row_commands"]["default"] in shown and again["row_commands"]["no growth"] in shown
    assert "| default | 0,1 |" in shown and "| no growth | 0 |" in shown and "Rows by run: default: commit" in shown
    folder = _load("folder")
    assert folder.main(["--quick", "--methods", "finetune,anpyc", "--results", str(tmp_path / "f"), "--no-write"]) == 0
    rows = json.loads((tmp_path / "f" / "folder_quick.json").read_text())
    assert [len(r["phases"]) for r in rows.values()] == [3, 3] and rows["anpyc"]["bwt"] == 0.0
    assert all(p["train_s"] >= 0 and p["prune_s"] >= 0 for r in rows.values() for p in r["phases"])


def test_benchmark_rows_restate_no_preset_setting():
    """The presets are the one source of every method's settings: a benchmark row overrides only what its own
    suite's validation search chose differently (a row that restates a preset's value would silently keep the old
    value when the preset changes)."""
    from anpyc.config import canonical_key, to_dict
    from anpyc.configure import method_config

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    suites = _load("suites")
    restated = []
    for suite in suites.SUITES.values():
        for name, row in suite.methods.items():
            preset = flat(to_dict(method_config(row.preset)))
            restated += [f"{suite.name}/{name}: {k}={v}" for k, v in row.overrides.items()
                         if preset.get(canonical_key(k)) == v]
    assert not restated, restated
    assert suites.SUITES["split-digits"].methods["si"].overrides == {"optim.lr": 0.01}


def test_pretrained_start_quick(tmp_path):
    """The pretrained-start benchmark pretrains a backbone itself (its classifier dropped), runs each row from the
    random init and from those weights side by side, and writes the section with its targets line."""
    from safetensors.torch import load_file

    pretrained = _load("pretrained")
    out, weights = tmp_path / "BENCHMARKS.md", tmp_path / "weights"
    assert pretrained.main(["--quick", "--seeds", "0", "--pairs", "mnist-to-digits", "--methods", "anpyc,packnet",
                            "--out", str(out), "--results", str(tmp_path / "results"),
                            "--weights-dir", str(weights)]) == 0
    (file,) = weights.glob("mnist5k-rotated-test_resnet-s0-*.safetensors")
    state = load_file(file)
    assert "conv1.0.weight" in state and not any(k.startswith("fc.") for k in state)
    rows = {(r[0], r[1]): r for r in (line.strip("|").split("|") for line in out.read_text().splitlines()
                                      if line.startswith("| anpyc |") or line.startswith("| packnet |"))}
    assert {(m.strip(), s.strip()) for m, s in ((k[0], k[1]) for k in rows)} == {
        ("anpyc", "random"), ("anpyc", "pretrained"), ("packnet", "random"), ("packnet", "pretrained")}
    assert all(_num(r[3].strip()) == 0.0 for r in rows.values())  # BWT of the hard-freeze rows
    assert "BWT of every hard-freeze run (anpyc, PackNet, both starts): exactly 0." in out.read_text()


def test_each_task_alone_quick(tmp_path):
    """The 'each task alone' benchmark runs the quickstart's recipe on the stream and on every task by itself from the
    same initial weights: the first task is trained the same way in both, so its two accuracies are equal."""
    alone = _load("alone")
    out, results = tmp_path / "BENCHMARKS.md", tmp_path / "results"
    assert alone.main(["--quick", "--seeds", "0", "--out", str(out), "--results", str(results)]) == 0
    doc = json.loads((results / "alone_quick.json").read_text())
    (run,) = doc["runs"]
    assert run["tasks"] == ["classes 0,1", "classes 2,3"]
    assert len(run["in_stream"]) == len(run["alone"]) == 2
    assert run["in_stream"][0] == run["alone"][0] > 0.75  # two classes: chance is 0.5
    rows = _rows(out.read_text(), "alone")
    assert _num(rows["0: classes 0,1"][1]) == pytest.approx(100 * run["in_stream"][0], abs=0.05)
    assert _num(rows["0: classes 0,1"][3]) == 0.0
    assert _num(rows["1: classes 2,3"][2]) == pytest.approx(100 * run["alone"][1], abs=0.05)
    written = out.read_text()
    out.write_text("# Benchmarks\n")
    assert alone.main(["--quick", "--render-only", "--out", str(out), "--results", str(results)]) == 0
    assert out.read_text() == written  # the section comes back from the results file, with the command that ran
