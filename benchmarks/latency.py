"""Latency of the exported task models: does removing channels buy the speed its FLOPs promise?

    python benchmarks/latency.py                     # resnet18, 64x64 and 224x224, batch 1 and 32; writes BENCHMARKS.md
    python benchmarks/latency.py --sizes 64 --batches 1 --repeats 5 --no-write

A learner with two tasks is trained briefly on synthetic data (resnet18, random init) with schedule pruning, so
each task's subnetwork keeps only part of the channels. The dense model (every unit, task 0's head) and each task
model are exported to ONNX at every input size (parity-checked against torch) and timed in onnxruntime with one
thread (``intra_op_num_threads=1``, ``inter_op_num_threads=1``, ``torch.set_num_threads(1)``). Measurements of
all models are interleaved round by round and summarised by their medians, so a load change on the shared machine
hits every model alike. Targets: task latency / dense latency <= 1.15 x task FLOPs / dense FLOPs; onnxruntime at
least 2x faster than torch eager on the same task model at batch 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

from _bench import ROOT, command_line, git_commit, machine, write_section

RESULTS = ROOT / "benchmarks" / "results" / "latency.json"
LATENCY_TARGET = 1.15
SPEEDUP_TARGET = 2.0


def _learner(model: str, train_size: int, ratio: float, seed: int):
    """Two synthetic tasks, each pruned to ``1 - ratio`` of the units it claims (one schedule step)."""
    import anpyc
    from anpyc.adapters.data import synthetic_stream
    from anpyc.configure import method_config

    cfg = method_config("anpyc", **{
        "seed": seed, "threads": 1, "checkpoint_epochs": False,
        "optim.epochs": 1, "optim.batch_size": 16, "optim.lr": 0.02,
        "importance.max_batches": 2, "importance.batch_size": 16,
        "prune.mode": "schedule", "prune.first_ratio": ratio, "prune.step": ratio, "prune.decay": 1.0,
        "prune.retrain_epochs": 1, "eval_batch_size": 64,
    })
    stream = synthetic_stream(num_tasks=2, classes_per_task=2, samples_per_class=32, img_size=train_size, seed=seed)
    learner = anpyc.ContinualLearner(model, input_spec=stream.input_spec, config=cfg)
    for i, task in enumerate(stream):
        learner.learn(task, final=i == len(stream) - 1)
    return learner


def _clean(module, learner):
    """Drop the masked model's norm hooks that a deep copy of the learner's trunk carries along."""
    ids = {h.id for h in learner.model._hooks}
    for m in module.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key in [key for key in hooks if key in ids]:
                del hooks[key]
    return module.eval()


def _models(learner) -> dict[str, object]:
    from anpyc.learner import TaskModel

    dense = TaskModel(copy.deepcopy(learner.trunk).cpu(), copy.deepcopy(learner.model.heads["0"]).cpu())
    out = {"dense": _clean(dense, learner)}
    for t in learner.task_ids():
        out[f"task {t}"] = _clean(learner.subnetwork(t), learner)
    return out


def _export(models: dict, size: int, folder: Path) -> dict[str, Path]:
    import torch

    from anpyc.export.onnx import export_verified

    paths = {}
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(b, 3, size, size, generator=g) for b in (1, 3, 2)]
    for name, module in models.items():
        with torch.no_grad():
            expected = [module(x).numpy() for x in inputs]
        path = folder / f"{name.replace(' ', '')}-{size}.onnx"
        export_verified(module, inputs, expected, path, threads=1)
        paths[name] = path
    return paths


def _time(fn, x) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def measure(models: dict, paths: dict, size: int, batch: int, repeats: int) -> dict:
    """Median seconds per forward of every model, onnxruntime and torch eager, measured round-robin."""
    import torch

    from anpyc.export.runtime import make_session

    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    xn = x.numpy()
    runners = {}
    for name, path in paths.items():
        sess = make_session(path, threads=1)
        iname, oname = sess.get_inputs()[0].name, sess.get_outputs()[0].name
        runners[("ort", name)] = (lambda s, i, o: (lambda a: s.run([o], {i: a})))(sess, iname, oname)
    for name, module in models.items():
        runners[("torch", name)] = (lambda m: (lambda a: m(a)))(module)
    inputs = {"ort": xn, "torch": x}
    times: dict[tuple, list[float]] = {k: [] for k in runners}
    with torch.no_grad():
        for k, fn in runners.items():  # warm up
            fn(inputs[k[0]])
            fn(inputs[k[0]])
        for _ in range(repeats):
            for k, fn in runners.items():
                times[k].append(_time(fn, inputs[k[0]]))
    return {f"{k[0]}:{k[1]}": statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--sizes", default="64,224", help="input sides (default %(default)s)")
    ap.add_argument("--batches", default="1,32", help="batch sizes (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds per configuration (default %(default)s)")
    ap.add_argument("--ratio", type=float, default=0.5,
                    help="share of its claimed units each task releases when pruned (default %(default)s)")
    ap.add_argument("--train-size", type=int, default=64, help="input side the learner trains on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from anpyc.flops import count_flops

    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.time()
    learner = _learner(args.model, args.train_size, args.ratio, args.seed)
    units = learner.space.num_units
    kept = {f"task {t}": int(learner.space.active(learner._index(t)).sum()) / units for t in learner.task_ids()}
    kept["dense"] = 1.0
    print(f"learned 2 tasks in {time.time() - t0:.0f} s; channels kept: {kept}", flush=True)
    models = _models(learner)
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="anpyc-latency-") as tmp:
        for size in sizes:
            paths = _export(models, size, Path(tmp))
            flops = {n: count_flops(m, torch.zeros(1, 3, size, size)) for n, m in models.items()}
            for batch in batches:
                reps = args.repeats if size * size * batch <= 64 * 64 * 32 else max(5, args.repeats // 2)
                med = measure(models, paths, size, batch, reps)
                for name in models:
                    if name == "dense":
                        continue
                    lat_ratio = med[f"ort:{name}"] / med["ort:dense"]
                    flop_ratio = flops[name] / flops["dense"]
                    rows.append({
                        "size": size, "batch": batch, "model": name, "channels": kept[name],
                        "params_ratio": params[name] / params["dense"], "flops_ratio": flop_ratio,
                        "ort_ms": med[f"ort:{name}"] * 1e3, "ort_dense_ms": med["ort:dense"] * 1e3,
                        "latency_ratio": lat_ratio, "latency_over_flops": lat_ratio / flop_ratio,
                        "torch_ms": med[f"torch:{name}"] * 1e3, "torch_dense_ms": med["torch:dense"] * 1e3,
                        "ort_speedup": med[f"torch:{name}"] / med[f"ort:{name}"], "repeats": reps,
                    })
                    r = rows[-1]
                    print(f"{size}px b{batch} {name}: ort {r['ort_ms']:.2f} ms (dense {r['ort_dense_ms']:.2f}) "
                          f"latency ratio {lat_ratio:.3f} vs flops {flop_ratio:.3f} -> {r['latency_over_flops']:.2f}x; "
                          f"torch {r['torch_ms']:.2f} ms, ort speedup {r['ort_speedup']:.2f}x", flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"model": args.model, "rows": rows, "commit": git_commit()}, indent=1))
    cmd = ["--model", args.model, "--sizes", args.sizes, "--batches", args.batches, "--repeats", str(args.repeats),
           "--ratio", str(args.ratio)]
    body = render(rows, args.model, command_line("latency.py", cmd))
    if args.no_write:
        print(body)
    else:
        write_section(args.out, "latency", body, title="Latency of task models")
        print(f"wrote the latency section of {args.out}")
    return 0


def render(rows: list[dict], model: str, command: str) -> str:
    lat_ok = sum(r["latency_over_flops"] <= LATENCY_TARGET for r in rows)
    b1 = [r for r in rows if r["batch"] == 1]
    sp_ok = sum(r["ort_speedup"] >= SPEEDUP_TARGET for r in b1)
    lines = [
        f"`{command}`",
        "",
        f"Commit {git_commit()}, {machine()}; a shared machine, so absolute times are noisy; ratios are medians of "
        "interleaved rounds. `{model}` (random init) learns two synthetic tasks with one schedule prune step each; "
        "*channels* = share of the walk's units in the task's subnetwork. onnxruntime CPU, 1 intra-op and 1 "
        "inter-op thread; torch eager with `torch.set_num_threads(1)`.".replace("{model}", model),
        "",
        f"Latency within {LATENCY_TARGET} x the FLOPs ratio: **{lat_ok} of {len(rows)}** rows. onnxruntime >= "
        f"{SPEEDUP_TARGET:g}x torch eager at batch 1: **{sp_ok} of {len(b1)}** rows.",
        "",
        "| input | batch | model | channels | params | FLOPs ratio | ORT ms (dense) | latency ratio | "
        "latency / FLOPs ratio | torch eager ms | ORT speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lat_miss = "" if r["latency_over_flops"] <= LATENCY_TARGET else " (miss)"
        sp_miss = "" if r["batch"] != 1 or r["ort_speedup"] >= SPEEDUP_TARGET else " (miss)"
        lines.append(
            f"| {r['size']}x{r['size']} | {r['batch']} | {r['model']} | {r['channels']:.0%} | "
            f"{r['params_ratio']:.0%} | {r['flops_ratio']:.3f} | {r['ort_ms']:.2f} ({r['ort_dense_ms']:.2f}) | "
            f"{r['latency_ratio']:.3f} | {r['latency_over_flops']:.2f}{lat_miss} | {r['torch_ms']:.2f} | "
            f"{r['ort_speedup']:.2f}x{sp_miss} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
