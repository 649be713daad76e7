"""Each task alone: is a task's accuracy in a stream what its data allows, or what the stream left it?

    python benchmarks/alone.py                     # the quickstart's stream and recipe, 3 seeds, writes BENCHMARKS.md
    python benchmarks/alone.py --seeds 0 --quick   # tiny settings (smoke test)

The reference for "the accuracies fall task by task": every task of the quickstart's stream (5 two-class tasks of
scikit-learn's digits at 32x32, ``mobilenetv3_small_050`` from random init, the quickstart's settings) trained
*alone*, as a one-task stream from the same initial weights (same seed) with the same method and budget, against
the same task learned in its place in the stream. Equal numbers say the data sets the level; a task below its alone
score lost accuracy to the tasks before it (less free capacity, frozen features it must reuse). Results go to
``benchmarks/results/alone.json`` and the ``alone`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import _bench
from _bench import fmt_pm, mean_std

SECTION = "alone"
QUICK = {"optim.epochs": 3, "prune.retrain_epochs": 1}


def _learn(stream, seed: int, threads: int, quick: bool, device: str) -> list[float]:
    """The last row of the accuracy matrix of the quickstart's recipe on ``stream`` (test accuracy per task)."""
    from anpyc.apps.quickstart import QUICKSTART_CONFIG, QUICKSTART_MODEL
    from anpyc.configure import method_config
    from anpyc.learner import ContinualLearner

    overrides = {**QUICKSTART_CONFIG, **(QUICK if quick else {}), "seed": seed, "threads": threads,
                 "device": device, "checkpoint_epochs": False}
    with tempfile.TemporaryDirectory() as tmp:
        learner = ContinualLearner(QUICKSTART_MODEL, input_spec=stream.input_spec, out_dir=Path(tmp) / "run",
                                   config=method_config("anpyc", **overrides))
        with learner:
            metrics = learner.fit(stream)
    return list(metrics["accuracy_matrix"][-1])


def measure(seed: int, args) -> dict:
    from anpyc.apps.quickstart import digits_stream
    from anpyc.task import TaskStream

    stream = digits_stream()
    if args.quick:
        stream = stream.take(2)
    in_stream = _learn(stream, seed, args.threads, args.quick, args.device)
    alone = []
    for task in stream:
        one = TaskStream.of(f"{stream.name}-task{task.id}", [replace(task, id=0)], stream.input_spec)
        alone.append(_learn(one, seed, args.threads, args.quick, args.device)[0])
    return {"seed": seed, "tasks": [t.name for t in stream], "in_stream": in_stream, "alone": alone}


def render(doc: dict, command: str) -> str:
    runs = doc["runs"]
    names = runs[0]["tasks"]
    from anpyc.apps.quickstart import QUICKSTART_CONFIG, QUICKSTART_MODEL

    epochs = {**QUICKSTART_CONFIG, **(QUICK if doc["quick"] else {})}["optim.epochs"]
    setup = (f"Commit {doc['commit']}, {doc['machine']}, {doc['threads']} torch thread(s); seeds "
             f"{', '.join(str(r['seed']) for r in runs)}. The quickstart's stream and settings (anpyc, "
             f"{QUICKSTART_MODEL} from random init, {epochs} epochs per task); each task also trained alone as a "
             "one-task stream from the same initial weights. Test accuracy (%), mean ± std over seeds; each task's "
             "test set holds about 72 images (one image is 1.4 pts).")
    lines = [f"Command: `{command}`", "", setup, "",
             "| task | in the stream | alone | stream − alone |", "|---|---|---|---|"]
    for i, name in enumerate(names):
        s = [r["in_stream"][i] for r in runs]
        a = [r["alone"][i] for r in runs]
        lines.append(f"| {i}: {name} | {fmt_pm(s)} | {fmt_pm(a)} | {fmt_pm([x - y for x, y in zip(s, a)], signed=True)} |")
    s_mean = [sum(r["in_stream"]) / len(names) for r in runs]
    a_mean = [sum(r["alone"]) / len(names) for r in runs]
    lines.append(f"| mean | {fmt_pm(s_mean)} | {fmt_pm(a_mean)} | "
                 f"{fmt_pm([x - y for x, y in zip(s_mean, a_mean)], signed=True)} |")
    gap, _ = mean_std([x - y for x, y in zip(s_mean, a_mean)])
    lines += ["", f"The stream costs {abs(gap) * 100:.1f} pts on average against each task learned alone."
              if gap < 0 else f"The stream costs nothing on average against each task learned alone "
              f"({gap * 100:+.1f} pts).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = _bench.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the markdown section from the results file, running nothing")
    args = parser.parse_args(argv)
    _bench.setup_torch(args.threads)
    seeds = _bench.parse_list(args.seeds, int)
    results = args.results or _bench.ROOT / "benchmarks" / "results"
    path = results / f"{SECTION}{'_quick' if args.quick else ''}.json"
    command = _bench.command_line("alone.py", [a for a in (argv if argv is not None else sys.argv[1:])])
    if args.render_only:
        doc = json.loads(path.read_text())
        _bench.write_section(args.out, SECTION, render(doc, doc.get("command", command)),
                             title="Each task alone: the data or the method?")
        return 0
    runs = []
    for seed in seeds:
        runs.append(measure(seed, args))
        print(f"seed {seed}: in stream {[round(100 * a, 1) for a in runs[-1]['in_stream']]}, "
              f"alone {[round(100 * a, 1) for a in runs[-1]['alone']]}", flush=True)
    doc = {"runs": runs, "machine": _bench.machine(), "threads": args.threads, "commit": _bench.git_commit(),
           "quick": args.quick, "command": command}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
    if not args.quick or args.out != _bench.ROOT / "BENCHMARKS.md":
        _bench.write_section(args.out, SECTION, render(doc, command),
                             title="Each task alone: the data or the method?")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
