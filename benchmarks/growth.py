"""Long task streams: permuted MNIST-5k at 100 tasks on a small MLP (784-64-64), anpyc with and without growth,
PackNet for reference (issue 12).

Every row learns the same 100 permutations (5 epochs per task, batch 64, seed 0); ACC@k is the mean test accuracy
over the first k tasks right after task k (row k of the accuracy matrix), so ACC@10 and ACC@30 are what a 10- or
30-task run of the same settings reports (the capacity plan does not look ahead). Rows:

* ``anpyc``: the preset as it ships (growth keeps a quarter of every group's base width free for each task, up to
  8x);
* ``anpyc-grow16``: growth keeping an eighth free per task, up to 16x the base width (a long stream's setting:
  the same growth, 8 new units per layer and task instead of 16);
* ``anpyc-fixed``: ``grow.enabled = false`` (the width stays 64-64);
* ``packnet``: element masks at a fixed width (its permuted50 setting, first_ratio 0.97).

    python benchmarks/growth.py                  # ~30 min on 2 cores
    python benchmarks/growth.py --quick          # seconds: the smoke test's settings
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _bench

SECTION = "growth"
COMMON = {"optim.epochs": 5}
ROWS: dict[str, tuple[str, dict]] = {
    "anpyc": ("anpyc", {}),
    "anpyc-grow16": ("anpyc", {"grow.min_free": 0.125, "grow.max_width": 16.0}),
    "anpyc-fixed": ("anpyc", {"grow.enabled": False}),
    "packnet": ("packnet", {"prune.first_ratio": 0.97}),
}
AT = (10, 30, 100)


def acc_at(matrix: list[list[float]], k: int) -> float | None:
    """Mean test accuracy over tasks 1..k right after task k (None when the run is shorter)."""
    if len(matrix) < k:
        return None
    row = matrix[k - 1][:k]
    return sum(row) / len(row)


def widths(result: dict, hidden: list[int]) -> str:
    """Final hidden widths of an MLP run: its unit count split over the two hidden layers (element masks own
    weights, not units: their width is the base width)."""
    if result["config"]["prune"]["granularity"] == "element" or not result.get("num_units"):
        return "-".join(map(str, hidden))
    return f"{result['num_units'] // 2}-{result['num_units'] // 2}"


def table(rows: dict[str, dict], num_tasks: int, hidden: list[int]) -> str:
    at = [k for k in AT if k <= num_tasks] or [num_tasks]
    head = "| row | " + " | ".join(f"ACC@{k}" for k in at) + " | BWT | params/task | final width | wall |"
    lines = [head, "|" + "---|" * (len(at) + 5)]
    for name, r in rows.items():
        dense = r.get("dense_params") or 1
        per_task = sum(r["task_params"]) / len(r["task_params"]) / dense if r.get("task_params") else float("nan")
        accs = " | ".join(_bench.fmt_pm([acc_at(r["accuracy_matrix"], k)]) for k in at)
        lines.append(f"| {name} | {accs} | {_bench.fmt_pm([r['bwt']], signed=True)} | {100 * per_task:.1f}% "
                     f"| {widths(r, hidden)} | {r['wall_seconds']:.0f} s |")
    return "\n".join(lines)


def verdicts(rows: dict[str, dict], num_tasks: int) -> str:
    """The growth issue's targets, computed from the rows: with growth ACC@100 >= ACC@10 - 2 pts; at 30 tasks the
    default at least as accurate as PackNet."""
    out = []
    for name in (n for n in rows if n.startswith("anpyc") and n != "anpyc-fixed"):
        first, last = acc_at(rows[name]["accuracy_matrix"], 10), acc_at(rows[name]["accuracy_matrix"], num_tasks)
        if first is not None and last is not None and num_tasks > 10:
            d = 100 * (last - first)
            verdict = "met" if d >= -2 else "missed"
            out.append(f"{name}: ACC@{num_tasks} − ACC@10 = {d:+.1f} pts (target ≥ −2: {verdict})")
    if "anpyc" in rows and "packnet" in rows and num_tasks >= 30:
        d = 100 * (acc_at(rows["anpyc"]["accuracy_matrix"], 30) - acc_at(rows["packnet"]["accuracy_matrix"], 30))
        out.append(f"anpyc − PackNet at 30 tasks = {d:+.1f} pts (target ≥ 0: {'met' if d >= 0 else 'missed'})")
    return ("Targets: " + "; ".join(out) + ".") if out else ""


def main(argv: list[str] | None = None) -> int:
    parser = _bench.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), default_seeds="0")
    parser.add_argument("--tasks", type=int, default=100, help="stream length (default %(default)s)")
    parser.add_argument("--cache", type=Path, default=None, help="folder caching one JSON per run (resumable)")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite the markdown section")
    args = parser.parse_args(argv)
    _bench.setup_torch(args.threads)
    seed = _bench.parse_list(args.seeds, int)[0]
    names = _bench.parse_list(args.methods) or list(ROWS)
    num_tasks, stream_kwargs, hidden, extra = args.tasks, {"num_tasks": args.tasks}, [64, 64], {}
    if args.quick:
        num_tasks, stream_kwargs, hidden = 3, {"num_tasks": 3, "limit": 60}, [8, 8]
        extra = {"optim.epochs": 1, "importance.max_batches": 2}
    rows = {}
    t0 = time.time()
    for name in names:
        preset, overrides = ROWS[name]
        spec = _bench.RunSpec("growth", name, preset, "mnist5k-permuted", "mlp", seed,
                              overrides={**COMMON, **overrides, **extra}, stream_kwargs=stream_kwargs,
                              backbone_kwargs={"hidden": hidden})
        rows[name] = _bench.run(spec, device=args.device, threads=args.threads, cache=args.cache)
    results = (args.results or _bench.ROOT / "benchmarks" / "results")
    results.mkdir(parents=True, exist_ok=True)
    argv_used = ["--tasks", str(num_tasks), "--seeds", str(seed)] + (["--quick"] if args.quick else [])
    if args.methods:
        argv_used += ["--methods", ",".join(names)]
    commit = _bench.git_commit()
    row_commits = {name: commit for name in rows}
    path = results / f"growth{'_quick' if args.quick else ''}.json"
    old = json.loads(path.read_text()) if path.exists() else None
    same_stream = old is not None and old.get("num_tasks", num_tasks if f"--tasks {num_tasks} " in old["command"]
                                              else None) == num_tasks
    if args.methods and same_stream and old["rows"] and all(r["spec"]["seed"] == seed for r in old["rows"].values()):
        # a partial run keeps the other rows of the same stream, and says which run measured them
        row_commits = _bench.kept_row_commits(old, row_commits)
        rows = {n: rows.get(n, old["rows"].get(n)) for n in [*ROWS] if n in rows or n in old["rows"]}
        argv_used = argv_used[: argv_used.index("--methods")] if "--methods" in argv_used else argv_used
        argv_used += ["--methods", ",".join(rows)]
    command = _bench.command_line("growth.py", argv_used)
    doc = {"command": command, "machine": _bench.machine(), "commit": commit, "num_tasks": num_tasks, "rows": rows,
           "row_commits": row_commits}
    path.write_text(json.dumps(doc, indent=1))
    older = {n: c for n, c in row_commits.items() if c != commit}
    kept = (f"Re-run at commit {commit}: {', '.join(n for n in rows if n not in older)}; kept from an earlier run: "
            + ", ".join(f"{n} (commit {c})" for n, c in older.items())
            + ". Wall times compare only within one run (shared machine).") if older else ""
    body = "\n".join([f"Permuted MNIST-5k, {num_tasks} tasks, MLP 784-{hidden[0]}-{hidden[1]}, 5 epochs per task, "
                      f"seed {seed}, {args.threads} thread(s); {_bench.machine()}.", "", "```", command, "```", "",
                      table(rows, num_tasks, hidden), "", verdicts(rows, num_tasks)] + (["", kept] if kept else []))
    print(body)
    print(f"done in {time.time() - t0:.0f}s")
    if not args.no_write and not args.quick:
        _bench.write_section(args.out, SECTION, body, title="Long streams: growth at 100 tasks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
