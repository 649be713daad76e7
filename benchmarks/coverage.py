"""Model coverage: does every backbone of a 50-model list walk, learn two pruned tasks and export with parity?

    python benchmarks/coverage.py                          # all 50 models, 2 parallel jobs, writes BENCHMARKS.md
    python benchmarks/coverage.py --models resnet18,vit_tiny_patch16_224 --jobs 1 --no-write
    nice -n 15 python benchmarks/coverage.py --families     # the smallest model of every timm model module

Each model runs ``anpyc.apps.check.check_model`` in its own subprocess (random init, never pretrained weights;
32x32 input or the smallest size the model accepts; two synthetic tasks, each pruned to about half of its units;
every task exported to ONNX and checked against the masked model in onnxruntime, max abs diff <= 1e-4), with a
per-model timeout, so one model that hangs or crashes costs only its own row. Results go to
``benchmarks/results/coverage.json`` (one entry per model, written as they finish) and the table to the
``coverage`` section of BENCHMARKS.md.

A pass needs the whole chain to succeed. A pass whose walk found no prunable group is reported as such (it
would export the dense model for every task); the "prunable" column is the share of the trunk's parameters
that belong to units of accepted groups, so partial coverage is visible.

``--families`` covers timm itself instead of a hand-picked list: for every model module timm registers
(``timm.list_modules()``; 98 in timm 1.0.x) it takes the module's smallest model by parameter count (counted on the
meta device, so nothing is allocated) and checks it the same way. A family passes when the check passes, which
includes ``check``'s own bar of at least half the trunk's parameters in maskable groups. The table goes to the
``families`` section of BENCHMARKS.md, summarised as "N of M families pass"; ``--rerun a,b`` checks only those
families again and keeps the other rows of the results file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from _bench import ROOT, command_line, git_commit, machine, write_section

MODELS: tuple[str, ...] = (
    "resnet18", "resnet50", "resnet18d", "seresnet18", "resnext26ts", "wide_resnet50_2", "res2net50_14w_8s",
    "skresnet18", "densenet121", "dla34", "dpn68", "vgg11_bn", "regnetx_002", "regnety_002", "efficientnet_b0",
    "tf_efficientnetv2_b0", "mobilenetv2_100", "mobilenetv3_small_100", "mobilenetv4_conv_small", "mnasnet_100",
    "ghostnet_100", "rexnet_100", "repvgg_a0", "hrnet_w18_small", "cspresnet50", "convnext_atto", "convnextv2_atto",
    "edgenext_xx_small", "inception_v3", "xception41", "hgnetv2_b0", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
    "vit_small_patch16_224", "swin_tiny_patch4_window7_224", "levit_128s", "mobilevit_xxs", "mobilevitv2_050",
    "efficientformer_l1", "poolformer_s12", "resmlp_12_224", "mixer_s16_224", "coat_lite_tiny", "cait_xxs24_224",
    "crossvit_tiny_240", "pvt_v2_b0", "fastvit_t8", "efficientvit_b0", "gcvit_xxtiny", "maxvit_nano_rw_256",
)
RESULTS = ROOT / "benchmarks" / "results" / "coverage.json"
FAMILY_RESULTS = ROOT / "benchmarks" / "results" / "families.json"
FAMILY_SELECTION = ROOT / "benchmarks" / "results" / "families-selection.json"
MIN_PRUNABLE = 0.5


# ================================================================================================ timm's families

def _param_count(name: str) -> int | None:
    """Parameters of timm model ``name`` without allocating them (built on the meta device)."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0)
        return int(sum(p.numel() for p in model.parameters()))
    except Exception:  # a model that does not build is not the family's smallest
        return None


def select_families(cache: Path = FAMILY_SELECTION, on_family=None, count: bool = True) -> list[dict]:
    """``[{"family", "model", "params", "models"}]``: the fewest-parameter model of every timm model module.

    Cached in ``cache`` (keyed by timm's version), module by module as they are counted: counting all ~1300
    models takes minutes, and an interrupted count continues where it stopped. ``on_family(entry)`` is called
    as each family is known (cached ones first), so checks can start while the rest is counted. With
    ``count=False`` families not in the cache yet are returned without a model (``"counted": False``)."""
    import warnings

    import timm

    done: dict[str, dict] = {}
    if cache.exists():
        data = json.loads(cache.read_text())
        if data.get("timm") == timm.__version__:
            done = {f["family"]: f for f in data["families"]}
    warnings.filterwarnings("ignore")
    modules = timm.list_modules()
    cache.parent.mkdir(parents=True, exist_ok=True)
    if on_family is not None:
        for module in modules:
            if module in done:
                on_family(done[module])
    for module in modules:
        if module in done:
            continue
        if not count:
            done[module] = {"family": module, "model": None, "params": None, "counted": False}
            continue
        names = timm.list_models(module=module)
        counted = [(n, c) for n in names if (c := _param_count(n)) is not None]
        if counted:
            name, n_params = min(counted, key=lambda nc: (nc[1], nc[0]))
            done[module] = {"family": module, "model": name, "params": n_params, "models": len(names)}
            print(f"  {module}: {name} ({n_params:,} parameters, smallest of {len(names)})", flush=True)
        else:
            done[module] = {"family": module, "model": None, "params": None, "models": len(names)}
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"timm": timm.__version__, "families": list(done.values())}, indent=1))
        tmp.replace(cache)
        if on_family is not None:
            on_family(done[module])
    return [done[m] for m in modules]


# ================================================================================================ one model

def _worker(model: str, out: Path, threads: int, steps: int) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from anpyc.apps.check import check_model

    result = check_model(model, threads=threads, steps=steps, min_prunable=MIN_PRUNABLE)
    out.write_text(json.dumps(result, default=str))


def _run_one(model: str, *, timeout: float, threads: int, steps: int, tmp: Path) -> dict:
    out = tmp / f"{model}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", model, "--worker-out", str(out),
           "--threads", str(threads), "--steps", str(steps)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"model": model, "ok": False, "stage": "timeout", "reason": f"timeout: no result in {timeout:.0f} s",
                "seconds": round(time.time() - t0, 1)}
    if out.exists():
        return json.loads(out.read_text())
    tail = " ".join((err or "").strip().splitlines()[-1:])[:300]
    return {"model": model, "ok": False, "stage": "crash", "reason": f"crash: exit code {proc.returncode}: {tail}",
            "seconds": round(time.time() - t0, 1)}


# ================================================================================================ table

def _fmt_params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def _verdict(r: dict) -> str:
    if not r.get("ok"):
        return "FAIL"
    if not r.get("groups"):
        return "pass, nothing prunable"
    if r.get("prunable_fraction", 0) < 0.25:
        return "pass, mostly not prunable"
    return "pass"


def _row(r: dict) -> str:
    kinds = r.get("group_kinds") or {}
    groups = f"{r.get('groups', 0)}" + (f" ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))})" if kinds
                                         else "")
    rej = r.get("rejected") or {}
    reasons = rej.get("reasons") or {}
    rej_txt = str(rej.get("count", 0))
    if reasons:
        rej_txt += ": " + "; ".join(f"{v}x {k}" for k, v in list(reasons.items())[:3])
    dense = r.get("dense_params")
    per_task = r.get("params_per_task") or []
    params = ", ".join(f"{p / dense:.0%}" for p in per_task) if dense and per_task else "-"
    parity = max(r["parity"]) if r.get("parity") else None
    size = r.get("img_size") or "-"
    cells = [
        f"`{r['model']}`", f"{size}", groups, rej_txt.replace("|", "/"), str(r.get("units", 0) or "-"),
        f"{r['prunable_fraction']:.0%}" if r.get("groups") else "0%",
        f"{params} of {_fmt_params(dense)}" if dense else "-",
        f"{parity:.1e}" if parity is not None else "-",
        _verdict(r) + ("" if r.get("ok") else f": {r.get('reason', '')}".replace("|", "/")[:160]),
        f"{r.get('seconds', 0):.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def render(results: list[dict], command: str) -> str:
    ok = [r for r in results if r.get("ok")]
    real = [r for r in ok if r.get("groups")]
    lines = [
        f"`{command}`",
        "",
        f"Commit {git_commit()}, {machine()}. Random init (`pretrained=False`), two synthetic tasks per model, each "
        "pruned to about half of its units (schedule mode), every task exported to ONNX and compared with the "
        "masked model in onnxruntime (max abs diff <= 1e-4).",
        "",
        f"**{len(ok)} of {len(results)} pass** ({len(real)} with prunable groups). Columns: *groups* accepted by "
        "the walk (all verified by masked-vs-sliced parity) and their kinds; *rejected* groups (single-unit groups "
        "not counted) with the commonest reasons; *prunable* = share of the trunk's parameters inside accepted "
        "groups; *params* = each task's subnetwork (trunk + head) as a share of the dense model; *parity* = worst "
        "max abs diff, onnxruntime vs masked model.",
        "",
        "| model | input | groups | rejected | units | prunable | params per task | parity | result | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(r) for r in results]
    fails = [r for r in results if not r.get("ok")]
    if fails:
        lines += ["", "Failures: " + "; ".join(f"`{r['model']}` ({r.get('reason', '')[:120]})" for r in fails)]
    return "\n".join(lines)


def _family_verdict(r: dict) -> str:
    if r.get("ok"):
        return "pass"
    if r.get("stage") == "missing":
        return "not run yet"
    reason = " ".join(str(r.get("reason", "")).split()).replace("|", "/")
    return "FAIL: " + (reason[:200] + ("..." if len(reason) > 200 else ""))


def _family_row(f: dict, r: dict) -> str:
    kinds = r.get("group_kinds") or {}
    groups = f"{r.get('groups', 0)}" + (f" ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))})" if kinds
                                         else "")
    rej = r.get("rejected") or {}
    parity = max(r["parity"]) if r.get("parity") else None
    cells = [
        f"{f['family']}", f"`{f['model']}`" if f.get("model") else "-", _fmt_params(f.get("params")),
        str(r.get("img_size") or "-"), f"{r.get('prunable_fraction', 0):.0%}" if "prunable_fraction" in r else "-",
        groups, str(rej.get("count", 0)), f"{parity:.1e}" if parity is not None else "-",
        f"{r.get('seconds', 0):.0f}", _family_verdict(r),
    ]
    return "| " + " | ".join(cells) + " |"


def _failure_kind(r: dict) -> str:
    stage = r.get("stage") or "?"
    if stage == "prunable":
        return "prunable: less than half of the trunk maskable"
    reason = str(r.get("reason", ""))
    head = reason.split(":", 2)
    return ": ".join(h.strip() for h in head[:2]) if len(head) > 1 else reason[:60]


def render_families(families: list[dict], results: dict[str, dict], command: str) -> str:
    rows = [(f, results.get(f["family"], {"ok": False, "stage": "missing", "reason": "not run yet"}))
            for f in families]
    passed = [f for f, r in rows if r.get("ok")]
    missing = sum(1 for _, r in rows if r.get("stage") == "missing")
    shares = sorted(r.get("prunable_fraction", 0.0) for _, r in rows if r.get("ok"))
    # rows keep the commit they were checked at: a rerun of some families leaves the others as they were
    commits = Counter(r.get("commit", "an earlier one, not recorded") for _, r in rows if r.get("stage") != "missing")
    at = (f"Commit {next(iter(commits))}" if len(commits) == 1 else
          "Rows checked at commits " + ", ".join(f"{c} ({n})" for c, n in commits.most_common()))
    lines = [
        f"`{command}`",
        "",
        f"{at}, {machine()}. For every model module of timm "
        f"{_timm_version()} the model with the fewest parameters (counted on the meta device), random init "
        "(`pretrained=False`), at the smallest input side it accepts (32 px first, else the fixed size it was built "
        "for). Each model runs `anpyc check`'s pipeline in its own process: walk (every group verified by "
        "masked-vs-sliced parity on a copy with unit-gain weights and random norms), two synthetic tasks learned "
        "and pruned to about half of their units, every task exported to ONNX and compared with the masked model in onnxruntime (max abs diff <= 1e-4). A family passes "
        f"when all of that succeeds and at least {MIN_PRUNABLE:.0%} of the trunk's parameters are in maskable "
        "groups (`anpyc check`'s default `--min-prunable`).",
        "",
        f"**{len(passed)} of {len(rows)} families pass**" + (f", {missing} not run yet" if missing else "") + (
            f" (median maskable share of the passing models {shares[len(shares) // 2]:.0%})." if shares else "."),
        "",
        "| family | smallest model | params | input | maskable | groups | rejected | parity | s | result |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_family_row(f, r) for f, r in rows]
    fails = [(f, r) for f, r in rows if not r.get("ok") and r.get("stage") != "missing"]
    if fails:
        kinds: dict[str, list[str]] = {}
        for f, r in fails:
            kinds.setdefault(_failure_kind(r), []).append(f["family"])
        lines += ["", "Failures by reason: " + "; ".join(f"{k} ({len(v)}: {', '.join(v)})"
                                                        for k, v in sorted(kinds.items(), key=lambda kv: -len(kv[1])))]
    return "\n".join(lines)


def _timm_version() -> str:
    import timm

    return timm.__version__


def _run_all(models: list[str], args, label: dict[str, str] | None = None):
    """Check every model in a subprocess (``args.jobs`` at a time); yields ``(model, result)`` as they finish."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    tmp = args.results.parent / ".coverage-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {pool.submit(_run_one, m, timeout=args.timeout, threads=args.threads, steps=args.steps,
                                   tmp=tmp): m for m in models}
            for fut in as_completed(futures):
                m = futures[fut]
                done[m] = r = fut.result()
                name = f"{label[m]} ({m})" if label else m
                print(f"[{len(done)}/{len(models)}] {name}: {'ok' if r.get('ok') else r.get('reason')} "
                      f"({r.get('seconds', 0):.0f} s)", flush=True)
                yield m, r
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main_families(args) -> int:
    """Check the smallest model of every timm family; checks start as soon as a family's model is known."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    results: dict[str, dict] = {}
    if (args.rerun or args.render_only) and args.results.exists():
        results = {r["family"]: r for r in json.loads(args.results.read_text())}
    rerun = {n.strip() for n in (args.rerun or "").split(",") if n.strip()}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".families-", dir=args.results.parent))  # this run's own: runs may overlap
    lock = threading.Lock()
    order: list[str] = []

    def save() -> None:
        with lock:
            rows = [results[f] for f in order if f in results] + [r for f, r in results.items() if f not in order]
            args.results.write_text(json.dumps(rows, indent=1, default=str))

    cmd_args = ["--families", "--jobs", str(args.jobs), "--threads", str(args.threads), "--steps", str(args.steps),
                "--timeout", f"{args.timeout:g}"]
    command = command_line("coverage.py", cmd_args)
    commit = git_commit()

    def check(f: dict) -> None:
        r = _run_one(f["model"], timeout=args.timeout, threads=args.threads, steps=args.steps, tmp=tmp)
        with lock:
            results[f["family"]] = dict(r, family=f["family"], command=command, commit=commit)
            n = sum(1 for k in results if k in order)
        print(f"[{n}] {f['family']} ({f['model']}): {'ok' if r.get('ok') else r.get('reason')} "
              f"({r.get('seconds', 0):.0f} s)", flush=True)
        save()

    pool = ThreadPoolExecutor(max_workers=max(1, args.jobs))

    def on_family(f: dict) -> None:
        order.append(f["family"])
        if args.render_only or (rerun and f["family"] not in rerun):
            return
        if not f.get("model"):
            results[f["family"]] = {"family": f["family"], "ok": False, "stage": "create",
                                    "reason": "create: no model of this module builds", "seconds": 0}
            return
        pool.submit(check, f)

    try:
        families = select_families(on_family=on_family, count=not args.render_only)
        pool.shutdown(wait=True)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
    used = Counter(r["command"] for r in results.values() if r.get("command"))
    body = render_families(families, results, used.most_common(1)[0][0] if args.render_only and used else command)
    if args.no_write:
        print(body)
    else:
        write_section(args.out, "families", body, title="Coverage over timm's model families")
        print(f"wrote the families section of {args.out}")
    passed = sum(1 for f in families if results.get(f["family"], {}).get("ok"))
    print(f"{passed} of {len(families)} families pass")
    return 0


# ================================================================================================ CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=None, help="comma-separated model names (default: the 50-model list)")
    ap.add_argument("--jobs", type=int, default=2, help="models checked in parallel (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per model (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per model (default %(default)s)")
    ap.add_argument("--steps", type=int, default=2, help="training steps per task (default %(default)s)")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="markdown file to update")
    ap.add_argument("--results", type=Path, default=RESULTS, help="JSON results file")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    ap.add_argument("--families", action="store_true", help="the smallest model of every timm model module")
    ap.add_argument("--render-only", action="store_true", help="with --families: write the table from the results "
                    "file, check nothing")
    ap.add_argument("--rerun", default=None, help="with --families: only these families (comma-separated), "
                    "keeping the other rows of the results file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.worker_out, args.threads, args.steps)
        return 0
    if args.families:
        if args.results == RESULTS:
            args.results = FAMILY_RESULTS
        return main_families(args)

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else list(MODELS)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    for m, r in _run_all(models, args):
        done[m] = r
        args.results.write_text(json.dumps([done[k] for k in models if k in done], indent=1, default=str))
    results = [done[m] for m in models]
    cmd_args = []
    if args.models:
        cmd_args += ["--models", args.models]
    cmd_args += ["--jobs", str(args.jobs), "--threads", str(args.threads), "--steps", str(args.steps)]
    body = render(results, command_line("coverage.py", cmd_args))
    if args.no_write:
        print(body)
    else:
        write_section(args.out, "coverage", body, title="Model coverage")
        print(f"wrote the coverage section of {args.out}")
    passed = sum(1 for r in results if r.get("ok"))
    print(f"{passed}/{len(results)} pass")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
