"""Model coverage: does every backbone of a 50-model list walk, learn two pruned tasks and export with parity?

    python benchmarks/coverage.py                          # all 50 models, 2 parallel jobs, writes BENCHMARKS.md
    python benchmarks/coverage.py --models resnet18,vit_tiny_patch16_224 --jobs 1 --no-write

Each model runs ``anpyc.apps.check.check_model`` in its own subprocess (random init, never pretrained weights;
32x32 input or the smallest size the model accepts; two synthetic tasks, each pruned to about half of its units;
every task exported to ONNX and checked against the masked model in onnxruntime, max abs diff <= 1e-4), with a
per-model timeout, so one model that hangs or crashes costs only its own row. Results go to
``benchmarks/results/coverage.json`` (one entry per model, written as they finish) and the table to the
``coverage`` section of BENCHMARKS.md.

A pass needs the whole chain to succeed. A pass whose walk found no prunable group is reported as such (it
would export the dense model for every task); the "prunable" column is the share of the trunk's parameters
that belong to units of accepted groups, so partial coverage is visible.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import ROOT, command_line, git_commit, machine, write_section  # noqa: E402

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


# ================================================================================================ one model

def _worker(model: str, out: Path, threads: int, steps: int) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from anpyc.apps.check import check_model

    result = check_model(model, threads=threads, steps=steps)
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
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.worker_out, args.threads, args.steps)
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else list(MODELS)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.results.parent / ".coverage-tmp"
    tmp.mkdir(exist_ok=True)
    done: dict[str, dict] = {}
    from concurrent.futures import ThreadPoolExecutor, as_completed

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(_run_one, m, timeout=args.timeout, threads=args.threads, steps=args.steps, tmp=tmp): m
                   for m in models}
        for fut in as_completed(futures):
            m = futures[fut]
            r = fut.result()
            done[m] = r
            print(f"[{len(done)}/{len(models)}] {m}: {'ok' if r.get('ok') else r.get('reason')} "
                  f"({r.get('seconds', 0):.0f} s)", flush=True)
            args.results.write_text(json.dumps([done[k] for k in models if k in done], indent=1, default=str))
    shutil.rmtree(tmp, ignore_errors=True)
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
