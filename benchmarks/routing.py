"""Task routing: how often `--task auto` (and `POST /predict`) sends a test image to its own task's model.

    python benchmarks/routing.py                       # split MNIST-5k and split digits, seed 0, writes BENCHMARKS.md
    python benchmarks/routing.py --suites split-digits  # one suite
    python benchmarks/routing.py --quick               # tiny settings (smoke test)

Each suite trains the forgetting benchmark's anpyc row (the default method; same stream, backbone, budget and
seed: timm ``resnet18`` on 32x32 grayscale, see ``benchmarks/forgetting.py``), exports every task to ONNX and
routes every test image of every task with :meth:`anpyc.export.runtime.ExportedModels.route` in onnxruntime:
each task model sees the image and the one with the lowest normalised predictive entropy answers. Reported: per
task and overall, the share of test images routed to their own task, the accuracy when the task is known and when
it is routed, and how routing accuracy grows as the answer's confidence rises (what to trust). Results go to
``benchmarks/results/routing.json`` and the ``routing`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from typing import Any

import _bench
import suites  # the suites: stream, backbone and budget of the runs routed here

SECTION = "routing"
SUITES = ("split-mnist", "split-digits")
METHOD = "anpyc"  # the default method preset
THRESHOLDS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99)
# Other scores a router could maximise, measured beside the one ExportedModels.route uses (for comparison only).
CRITERIA = {
    "max softmax probability": lambda z, p: p.max(axis=1),
    "energy (log-sum-exp of the logits)": lambda z, p: _logsumexp(z),
    "max logit": lambda z, p: z.max(axis=1),
}


def _logsumexp(z):
    m = z.max(axis=1)
    return m + __import__("numpy").log(__import__("numpy").exp(z - m[:, None]).sum(axis=1))


def _test_inputs(task) -> tuple[Any, Any]:
    import numpy as np

    items = [task.test[i] for i in range(len(task.test))]
    x = np.stack([item[0].numpy() for item in items]).astype(np.float32)
    y = np.asarray([int(item[1]) for item in items])
    return x, y


def route_suite(name: str, seed: int, args) -> dict[str, Any]:
    """Train the suite's anpyc run, export it, route every test image; the measurements as a dict."""
    import numpy as np

    from anpyc.export.exporter import export_all
    from anpyc.export.runtime import ROUTING_CRITERION, load_export, softmax

    suite = suites.SUITES[name]
    spec = suites.specs(suite, METHOD, [seed], quick=args.quick)[0]
    cfg = spec.config(device=args.device, threads=args.threads)
    stream = _bench.spec_stream(spec)
    t0 = time.perf_counter()
    learner = _bench.new_learner(spec, cfg, stream)
    metrics = learner.fit(stream)
    train_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        export_all(learner, tmp, threads=args.threads)
        models = load_export(tmp, threads=args.threads)
        t1 = time.perf_counter()
        ids = models.task_ids
        tasks, conf_all, own_all = [], [], []
        confusion = [[0] * len(ids) for _ in ids]
        other = {name: 0 for name in CRITERIA}
        for j, task in zip(ids, stream):
            x, y = _test_inputs(task)
            known = np.asarray([p[0]["index"] for p in models.predict(j, x)])
            logits = [models.logits(t, x).astype(np.float64) for t in ids]
            for name, score in CRITERIA.items():
                best = np.argmax(np.stack([score(z, softmax(z)) for z in logits], axis=1), axis=1)
                other[name] += int((np.asarray(ids)[best] == j).sum())
            routed = models.route(x)
            to = np.asarray([r["task"] for r in routed])
            top = np.asarray([r["predictions"][0]["index"] for r in routed])
            conf = np.asarray([r["confidence"] for r in routed])
            own = to == j
            for t in to:
                confusion[j][ids.index(int(t))] += 1
            tasks.append({"task": j, "name": task.name, "images": int(len(y)), "routed_own": float(own.mean()),
                          "acc_known": float((known == y).mean()), "acc_routed": float((own & (top == y)).mean()),
                          "confidence_own": float(conf[own].mean()) if own.any() else None,
                          "confidence_other": float(conf[~own].mean()) if (~own).any() else None})
            conf_all.append(conf)
            own_all.append(own)
        route_s = time.perf_counter() - t1
    conf, own = np.concatenate(conf_all), np.concatenate(own_all)
    images = sum(t["images"] for t in tasks)
    trust = [{"threshold": c, "coverage": float((conf >= c).mean()),
              "routed_own": float(own[conf >= c].mean()) if (conf >= c).any() else None} for c in THRESHOLDS]
    return {
        "suite": name, "title": suite.title, "stream": spec.stream, "backbone": spec.backbone, "seed": seed,
        "method": METHOD, "overrides": spec.overrides, "criterion": ROUTING_CRITERION, "images": images,
        "routed_own": float(own.mean()),
        "acc_known": sum(t["acc_known"] * t["images"] for t in tasks) / images,
        "acc_routed": sum(t["acc_routed"] * t["images"] for t in tasks) / images,
        "acc_recorded": metrics.get("acc"), "tasks": tasks, "trust": trust, "confusion": confusion,
        "other_criteria": {name: n / images for name, n in other.items()},
        "confidence_wrong": float(conf[~own].mean()) if (~own).any() else None,
        "confidence_right": float(conf[own].mean()) if own.any() else None,
        "train_seconds": train_s, "route_seconds": route_s, "route_ms_per_image": 1000 * route_s / max(images, 1),
    }


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _conf(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def trust_sentence(r: dict[str, Any]) -> str:
    """The advice, from the measured numbers: how far routing can be trusted on this stream."""
    good = [t for t in r["trust"] if t["routed_own"] is not None and t["routed_own"] >= 0.99 and t["coverage"] > 0]
    head = (f"Routing picks the right task for {_pct(r['routed_own'])}% of the test images (task known: accuracy "
            f"{_pct(r['acc_known'])}%; routed: {_pct(r['acc_routed'])}%).")
    if r["routed_own"] >= 0.99:
        return head + " Here `--task auto` can stand in for the task id."
    if good:
        g = good[0]
        return (head + f" Trust `--task auto` only where its confidence is at least {g['threshold']:g} (right "
                f"{_pct(g['routed_own'])}% of the time, {_pct(g['coverage'])}% of the images); below that, pass the "
                "task id.")
    return head + (" No confidence threshold makes it reliable (99%) on this stream: pass the task id when it is "
                   "known, and treat the routed task as a guess.")


def why(r: dict[str, Any]) -> str:
    """What the confusion says: how sure the task models are of images that are not theirs, which task attracts."""
    conf = r["confusion"]
    received = [sum(row[t] for row in conf) for t in range(len(conf))]
    top = max(range(len(received)), key=lambda t: received[t])
    parts = []
    right, wrong = r.get("confidence_right"), r.get("confidence_wrong")
    if right is not None and wrong is not None:
        both = f"(mean confidence {wrong:.2f} of the wrong answers, {right:.2f} of the right ones)"
        if wrong >= right - 0.05:
            parts.append(f"Each task model learned its own classes only and is about as sure of another task's image "
                         f"as of its own {both}")
        else:
            parts.append(f"Wrong answers are less sure than right ones {both}")
    share = received[top] / max(sum(received), 1)
    if share > 1.5 / len(conf):
        parts.append(f"task {r['tasks'][top]['task']} answers {_pct(share)}% of all images")
    return ("; ".join(parts) + ".") if parts else ""


def render(results: list[dict[str, Any]], command: str, doc: dict[str, Any]) -> str:
    lines = [
        "## Task routing: `--task auto` without a task id",
        "",
        "```",
        command,
        "```",
        "",
        f"Commit {doc['commit']}; {doc['machine']}; {doc['threads']} thread(s); seed {doc['seed']}.",
        "",
        "`anpyc predict --task auto` and `POST /predict` (no task id) run every task model on the input and answer "
        "with the task whose prediction has the **lowest normalised predictive entropy** (entropy / log(classes), "
        "so tasks with different class counts compare fairly); the answer's confidence is 1 - that entropy. Each "
        "suite trains the forgetting benchmark's anpyc row (default method, same budget and seed), exports every "
        "task and routes every test image in onnxruntime. *own task* = share of a task's test images routed to "
        "that task; *acc known* = accuracy with the task id given; *acc routed* = right task and right class "
        "(what `--task auto` delivers). The trust table gives, for answers at or above a confidence, the share of "
        "images that reach it (coverage) and how often their task is right.",
    ]
    for r in results:
        lines += ["", f"### {r['title']}", "",
                  f"`{r['backbone']}`, {len(r['tasks'])} tasks, {r['images']} test images; trained in "
                  f"{r['train_seconds']:.0f}s, routed at {r['route_ms_per_image']:.1f} ms per image "
                  f"(all {len(r['tasks'])} task models).", "",
                  "| task | images | own task (%) | acc known (%) | acc routed (%) | confidence, right / wrong task |",
                  "|---|---|---|---|---|---|"]
        for t in r["tasks"]:
            lines.append(f"| {t['task']}: {t['name']} | {t['images']} | {_pct(t['routed_own'])} | "
                         f"{_pct(t['acc_known'])} | {_pct(t['acc_routed'])} | "
                         f"{_conf(t['confidence_own'])} / {_conf(t['confidence_other'])} |")
        lines.append(f"| overall | {r['images']} | {_pct(r['routed_own'])} | {_pct(r['acc_known'])} | "
                     f"{_pct(r['acc_routed'])} | |")
        lines += ["", "| confidence at least | coverage (%) | own task (%) |", "|---|---|---|"]
        for t in r["trust"]:
            lines.append(f"| {t['threshold']:g} | {_pct(t['coverage'])} | {_pct(t['routed_own'])} |")
        lines += ["", f"**When to trust it:** {trust_sentence(r)} {why(r)}"]
        others = "; ".join(f"{name} {_pct(v)}%" for name, v in r["other_criteria"].items())
        lines += ["", f"Other scores, for comparison (own task, overall): {others}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _bench.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), default_seeds="0")
    parser.add_argument("--suites", default=",".join(SUITES), help="comma-separated: " + ", ".join(SUITES))
    parser.add_argument("--no-write", action="store_true", help="do not rewrite the markdown section")
    args = parser.parse_args(argv)
    _bench.setup_torch(args.threads)
    seeds = _bench.parse_list(args.seeds, int)
    if len(seeds) != 1:
        parser.error("routing runs one seed (--seeds N)")
    names = _bench.parse_list(args.suites)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        parser.error(f"unknown suite {unknown[0]!r}; choose from {', '.join(SUITES)}")
    results = []
    for name in names:
        t0 = time.time()
        results.append(route_suite(name, seeds[0], args))
        r = results[-1]
        print(f"[{name}] routed to own task {_pct(r['routed_own'])}%, acc known {_pct(r['acc_known'])}%, routed "
              f"{_pct(r['acc_routed'])}% ({time.time() - t0:.0f}s)", flush=True)
    parts = [*(["--quick"] if args.quick else []), "--suites", ",".join(names), "--seeds", str(seeds[0]),
             "--threads", str(args.threads), *(["--device", args.device] if args.device != "cpu" else [])]
    doc = {"command": _bench.command_line("routing.py", parts), "commit": _bench.git_commit(),
           "machine": _bench.machine(), "threads": args.threads, "seed": seeds[0], "quick": args.quick,
           "suites": results}
    results_dir = args.results or (args.out.resolve().parent / "benchmarks" / "results")
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{SECTION}{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(doc, indent=1))
    if not args.no_write:
        _bench.write_section(args.out, SECTION, render(results, doc["command"], doc))
        print(f"wrote the {SECTION} section of {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
