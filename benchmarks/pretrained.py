"""The pretrained-start benchmark: continual learning from weights trained elsewhere, offline.

    python benchmarks/pretrained.py                        # both pairs, 3 seeds, writes BENCHMARKS.md
    python benchmarks/pretrained.py --pairs mnist-to-digits --seeds 0
    python benchmarks/pretrained.py --quick                # tiny settings (smoke test)

Most users start a backbone from weights trained on other data. Each *pair* pretrains a backbone on one bundled
source (all its classes at once, as a classifier; the classifier is then dropped, as it is for timm's weights) and
learns a split stream of the other source from it:

* ``mnist-to-digits`` -- resnet18 pretrained on the MNIST-5k training images (10 classes), then split digits;
* ``digits-to-mnist`` -- resnet18 pretrained on the sklearn digits training images, then split MNIST-5k.

Every method row (anpyc, PackNet, fine-tuning, joint training; their settings and budgets are the forgetting
benchmark's rows of the same stream, :mod:`forgetting`) runs from the random init and from the pretrained weights,
side by side, per seed; the backbone of seed ``s`` is pretrained with seed ``s``. The pretraining recipe is
:data:`PRETRAIN` (the one a user would write: AdamW, a few epochs). Results go to ``benchmarks/results/pretrained.json``
and the ``pretrained`` section of BENCHMARKS.md. Pretrained weight files are cached under ``--weights-dir``
(not committed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import _bench
import suites
from _bench import fmt_pm, mean_std

SECTION = "pretrained"
METHODS = ("anpyc", "packnet", "finetune", "joint")
STARTS = ("random", "pretrained")
# rows beside the defaults, from the pretrained start only: row -> (the suite's row it changes, its overrides). A
# smaller step size is what fine-tuning from trained weights usually takes; measured, not made the default
VARIANTS = {"anpyc-lr0.01": ("anpyc", {"optim.lr": 0.01})}


def starts(method: str) -> tuple[str, ...]:
    return ("pretrained",) if method in VARIANTS else STARTS
# pair -> (pretraining source stream, the forgetting suite learned from it)
PAIRS = {"mnist-to-digits": ("mnist5k-rotated", "split-digits"), "digits-to-mnist": ("digits-rotated", "split-mnist")}
PRETRAIN = {"epochs": 3, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.05}
QUICK_PRETRAIN = {"epochs": 1, "batch_size": 32, "lr": 2e-3, "weight_decay": 0.05, "limit": 200}


def pretrain(source: str, backbone: str, backbone_kwargs: dict, seed: int, folder: Path, recipe: dict,
             log=print) -> Path:
    """A backbone trained as a classifier on every class of ``source`` (its unrotated task: 10 classes), its
    classifier dropped, saved as safetensors; cached by source, backbone, seed and recipe."""
    key = hashlib.sha256(json.dumps([source, backbone, backbone_kwargs, seed, recipe], sort_keys=True).encode())
    path = folder / f"{source}-{backbone}-s{seed}-{key.hexdigest()[:10]}.safetensors"
    if path.exists():
        return path
    import timm
    import torch
    from safetensors.torch import save_file

    from anpyc.adapters.data import make_stream

    task = make_stream(source, num_tasks=1, img_size=32, seed=seed, limit=recipe.get("limit"))[0]
    xs = torch.stack([task.train[i][0] for i in range(len(task.train))])
    ys = torch.tensor([int(task.train[i][1]) for i in range(len(task.train))])
    torch.manual_seed(seed)
    model = timm.create_model(backbone, pretrained=False, num_classes=len(task.classes), in_chans=xs.shape[1],
                              **backbone_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    t0, acc = time.perf_counter(), math.nan
    for _ in range(recipe["epochs"]):
        model.train()
        order, correct = torch.randperm(len(xs)), 0
        for i in range(0, len(xs), recipe["batch_size"]):
            idx = order[i: i + recipe["batch_size"]]
            logits = model(xs[idx])
            loss = torch.nn.functional.cross_entropy(logits, ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == ys[idx]).sum())
        acc = correct / len(xs)
    classifier = model.pretrained_cfg.get("classifier", "fc")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(f"{classifier}.")}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, tmp, metadata={"source": source, "seed": str(seed), "train_acc": f"{acc:.4f}"})
    tmp.replace(path)
    log(f"  pretrained {backbone} on {source} (seed {seed}): train acc {acc:.3f} in {time.perf_counter() - t0:.0f}s")
    return path


def specs(pair: str, method: str, start: str, seeds: list[int], args) -> list[_bench.RunSpec]:
    source, suite_name = PAIRS[pair]
    suite = suites.SUITES[suite_name]
    base, extra = VARIANTS.get(method, (method, {}))
    runs = suites.specs(suite, base, seeds, quick=args.quick)
    out = []
    for spec in runs:
        spec = replace(spec, suite=f"pretrained-{pair}", method=f"{method}/{start}",
                       overrides={**spec.overrides, **extra})
        if start == "pretrained":
            weights = pretrain(source, spec.backbone, spec.backbone_kwargs, spec.seed, args.weights_dir,
                               QUICK_PRETRAIN if args.quick else PRETRAIN)
            spec = replace(spec, weights=str(weights))
        out.append(spec)
    return out


def _params(r: dict) -> float:
    tp, dp = r.get("task_params") or [], r.get("dense_params")
    return sum(tp) / len(tp) / dp if tp and dp else math.nan


def table(pair: str, rows: dict[str, list[dict]]) -> str:
    source, suite_name = PAIRS[pair]
    lines = ["| method | start | ACC (%) | BWT (pts) | params/task (%) | val ACC (%) | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for method in (*METHODS, *VARIANTS):
        for start in starts(method):
            runs = rows.get(f"{method}/{start}")
            if not runs:
                continue
            lines.append(f"| {method} | {start} | {fmt_pm(r['acc'] for r in runs)} | "
                         f"{fmt_pm((r['bwt'] for r in runs), signed=True)} | "
                         f"{fmt_pm((_params(r) for r in runs), digits=0)} | {fmt_pm(r['val_acc'] for r in runs)} | "
                         f"{fmt_pm((r['wall_seconds'] for r in runs), scale=1, digits=0)} |")
    return "\n".join(lines)


def targets(rows: dict[str, list[dict]]) -> str:
    def acc(name: str) -> float:
        return mean_std(r["acc"] for r in rows.get(name, []))[0]

    mine, packnet, scratch = acc("anpyc/pretrained"), acc("packnet/pretrained"), acc("anpyc/random")
    if any(math.isnan(v) for v in (mine, packnet, scratch)):
        return "Targets: not every row was run."
    bwt = [r["bwt"] for m in ("anpyc", "packnet") for s in STARTS for r in rows.get(f"{m}/{s}", [])]
    exact = all(b == 0 for b in bwt)

    def verdict(d: float) -> str:
        return f"{100 * d:+.2f} pts ({'met' if d >= 0 else 'missed'})"

    text = (f"Targets for the default `anpyc` from the pretrained start: ACC − PackNet's from the same start = "
            f"{verdict(mine - packnet)}; ACC − anpyc's from the random init = {verdict(mine - scratch)}. "
            f"BWT of every hard-freeze run (anpyc, PackNet, both starts): {'exactly 0' if exact else 'NOT 0'}.")
    for name in VARIANTS:
        if rows.get(f"{name}/pretrained"):
            v = acc(f"{name}/pretrained")
            text += (f" `{name}` from the pretrained start: {100 * (v - mine):+.2f} pts over the default from it, "
                     f"{100 * (v - scratch):+.2f} against anpyc from the random init.")
    return text


def render(doc: dict, command: str) -> str:
    parts = [f"```\n{command}\n```", "",
             f"Seeds {', '.join(map(str, doc['seeds']))}; {doc['machine']}; {doc['threads']} thread(s); commit "
             f"{doc['commit']}.", "",
             "Each backbone is pretrained by the benchmark itself (seed = the run's seed) as a 10-class classifier on "
             "one bundled source: " + ", ".join(f"{k}: {v}" for k, v in PRETRAIN.items()) + ", its classifier "
             "dropped; the stream is then learned from it with `weights=FILE` (`--weights FILE` on the CLI). Method "
             "settings and budgets are the forgetting benchmark's rows of the same stream. Rows run seed by seed, "
             "every row of a seed side by side; a resumed run (`--cache`) takes finished runs from its cache, so wall "
             "times may come from different sittings of a shared machine: they are rough, the accuracies are exact "
             "(a run repeated gives the same accuracy matrix)."]
    for pair, rows in doc["pairs"].items():
        source, suite = PAIRS[pair]
        parts += ["", f"### {suites.SUITES[suite].title}, pretrained on {source} (unrotated, 10 classes)", "",
                  table(pair, rows), "", targets(rows)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = _bench.common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--variants", action="store_true", help="also run the rows of VARIANTS")
    parser.add_argument("--pairs", default=",".join(PAIRS), help="comma-separated: " + ", ".join(PAIRS))
    parser.add_argument("--cache", type=Path, default=None, help="folder caching one JSON per run (resumable)")
    parser.add_argument("--weights-dir", type=Path, default=_bench.ROOT / "benchmarks" / ".weights",
                        help="where pretrained backbones are cached (default %(default)s, not committed)")
    args = parser.parse_args(argv)
    _bench.setup_torch(args.threads)
    seeds = _bench.parse_list(args.seeds, int)
    methods = _bench.parse_list(args.methods) or [*METHODS, *(VARIANTS if args.variants else ())]
    results = args.results or _bench.ROOT / "benchmarks" / "results"
    path = results / f"{SECTION}{'_quick' if args.quick else ''}.json"
    doc = json.loads(path.read_text()) if path.exists() else {"pairs": {}}
    for pair in _bench.parse_list(args.pairs):
        if pair not in PAIRS:
            parser.error(f"unknown pair {pair!r} (choose from {', '.join(PAIRS)})")
        rows = doc["pairs"].setdefault(pair, {})
        for seed in seeds:  # seed by seed: a partial run still compares every row of its seeds
            for method in methods:
                for start in starts(method):
                    (spec,) = specs(pair, method, start, [seed], args)
                    result = _bench.run(spec, device=args.device, threads=args.threads, cache=args.cache)
                    runs = [r for r in rows.get(spec.method, []) if r["spec"]["seed"] != seed]
                    rows[spec.method] = sorted(runs + [result], key=lambda r: r["spec"]["seed"])
        doc.update(seeds=sorted({r["spec"]["seed"] for rs in rows.values() for r in rs}), machine=_bench.machine(),
                   threads=args.threads, commit=_bench.git_commit())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1))
    command = _bench.command_line("pretrained.py", [a for a in (argv if argv is not None else sys.argv[1:])])
    if not args.quick or args.out != _bench.ROOT / "BENCHMARKS.md":
        _bench.write_section(args.out, SECTION, render(doc, command), title="Starting from pretrained weights")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
