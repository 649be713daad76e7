"""The forgetting benchmark: ACC, BWT, forgetting, capacity and wall time of every method on standard streams.

    python benchmarks/forgetting.py                                   # every suite, 3 seeds, writes BENCHMARKS.md
    python benchmarks/forgetting.py --suites permuted10 --seeds 0     # one suite, one seed
    python benchmarks/forgetting.py --search --suites permuted10      # the validation search behind the presets
    python benchmarks/forgetting.py --quick                           # tiny settings (smoke test)

Suites (task-incremental: one head per task, the task id known at test time):

* ``permuted10`` — permuted MNIST-5k, 10 tasks, MLP 784-256-256 (the paper mode on its own 784-64-32);
* ``permuted50`` — the same stream at 50 tasks: anpyc against the best baseline of ``permuted10``;
* ``split-mnist`` — split MNIST-5k, 5 two-class tasks, timm ``resnet18`` on 32x32 grayscale;
* ``split-digits`` — split sklearn digits, 5 two-class tasks, timm ``resnet18`` on 32x32 grayscale.

Every hyper-parameter that differs from a method's preset was chosen on the validation splits (``--search``;
the grids are :data:`SEARCH`), never on test. Results (accuracy matrices of every run) are written to
``benchmarks/results/forgetting_<suite>.json``, the ACC-vs-tasks plots to ``benchmarks/results/``, the tables to
the ``forgetting`` section of BENCHMARKS.md (rebuilt from every suite's results file, so suites can be run
separately).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _bench
from _bench import mean_std
from forgetting_report import SECTION, _command, _load, plot, render
from suites import BASELINES, DEFAULT_SUITES, SEARCH, SUITES, Suite, grid, specs


def best_baseline(results_dir: Path, quick: bool) -> str | None:
    """The continual-learning baseline with the highest mean validation ACC in the permuted10 results."""
    path = results_dir / f"{SECTION}_permuted10{'_quick' if quick else ''}.json"
    if not path.exists():
        return None
    rows = json.loads(path.read_text())["rows"]
    scored = [(mean_std(r["val_acc"] for r in runs)[0], name) for name, runs in rows.items() if name in BASELINES]
    return max(scored)[1] if scored else None


def run_suite(suite: Suite, methods: list[str], seeds: list[int], args) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for method in methods:
        rows[method] = [_bench.run(s, device=args.device, threads=args.threads, cache=args.cache, fresh=args.fresh)
                        for s in specs(suite, method, seeds, quick=args.quick)]
    return rows


def run_search(suite: Suite, methods: list[str], seeds: list[int], args) -> dict[str, list[dict]]:
    space = SEARCH.get(suite.name, {})
    out: dict[str, list[dict]] = {}
    for method in methods:
        if method not in space:
            continue
        out[method] = []
        for point in grid(space[method]):
            runs = [_bench.run(s, device=args.device, threads=args.threads, cache=args.cache, fresh=args.fresh)
                    for s in specs(suite, method, seeds, quick=args.quick, point=point)]
            out[method].append({"point": point, "val_acc": [r["val_acc"] for r in runs],
                                "wall_seconds": [r["wall_seconds"] for r in runs],
                                "capacity": [r["capacity"][-1] if r["capacity"] else None for r in runs],
                                "diverged": [r.get("diverged") for r in runs]})
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _bench.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--suites", default=",".join(DEFAULT_SUITES), help="comma-separated: " + ", ".join(SUITES))
    parser.add_argument("--search", action="store_true", help="run the validation grids of SEARCH instead")
    parser.add_argument("--cache", type=Path, default=None, help="folder caching one JSON per run (resumable)")
    parser.add_argument("--fresh", action="store_true", help="ignore cached runs")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite the markdown section")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the markdown section from the results files, running nothing")
    args = parser.parse_args(argv)
    _bench.setup_torch(args.threads)
    seeds = _bench.parse_list(args.seeds, int)
    results_dir = args.results or (args.out.resolve().parent / "benchmarks" / "results")
    results_dir.mkdir(parents=True, exist_ok=True)
    tag = "_quick" if args.quick else ""
    for name in [] if args.render_only else _bench.parse_list(args.suites):
        if name not in SUITES:
            parser.error(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
        suite = SUITES[name]
        methods = _bench.parse_list(args.methods) or list(suite.methods)
        if name == "permuted50" and args.methods is None:
            best = best_baseline(results_dir, args.quick) or "packnet"
            methods = ["anpyc", "anpyc-element", best]
            print(f"[permuted50] best baseline of permuted10 (validation ACC): {best}")
        unknown = [m for m in methods if m not in suite.methods]
        if unknown:
            parser.error(f"suite {name} has no method {unknown[0]!r}; choose from {', '.join(suite.methods)}")
        print(f"[{name}] {'search' if args.search else 'run'}: {', '.join(methods)}; seeds {seeds}", flush=True)
        t0 = time.time()
        doc = {"command": "", "seeds": seeds, "threads": args.threads, "device": args.device,
               "machine": _bench.machine(), "commit": _bench.git_commit(), "quick": args.quick}
        if args.search:
            doc["search"] = run_search(suite, methods, seeds, args)
            path = results_dir / f"search_{name}{tag}.json"
            old = _load(path)
            if old is not None and args.methods is not None:  # a partial search keeps the other methods' grids
                doc["search"] = {**old["search"], **doc["search"]}
        else:
            doc["rows"] = run_suite(suite, methods, seeds, args)
            path = results_dir / f"{SECTION}_{name}{tag}.json"
            old = _load(path)
            doc["row_commits"] = {m: doc["commit"] for m in doc["rows"]}
            if old is not None and args.methods is not None and old.get("seeds") == seeds:
                doc["rows"] = {**old["rows"], **doc["rows"]}  # a partial run keeps the other rows
                doc["row_commits"] = _bench.kept_row_commits(old, doc["row_commits"])
            plot(suite, doc["rows"], results_dir / f"acc_vs_tasks_{name}{tag}.png", quick=args.quick)
        doc["command"] = _command(name, list(doc["search"] if args.search else doc["rows"]), suite, args, seeds)
        path.write_text(json.dumps(doc, indent=1))
        print(f"[{name}] done in {time.time() - t0:.0f}s -> {path}", flush=True)
    if not args.no_write:
        rel = Path("benchmarks/results")
        try:
            rel = results_dir.resolve().relative_to(args.out.resolve().parent)
        except ValueError:
            rel = results_dir.resolve()
        _bench.write_section(args.out, SECTION, render(results_dir, args.out, args.quick, str(rel)),
                             title=None)
        print(f"wrote the {SECTION} section of {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
