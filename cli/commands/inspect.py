"""Show what a run holds: per task its units (per group/layer), capacity left, params, FLOPs; the mask file.

Reads the run's files only (run.json, the committed state, masks.safetensors): no model is built, so it is quick
for any backbone and works on a run that is still training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def _segments(schema: dict) -> list[dict[str, Any]]:
    """Unit groups (structured) or weight tensors (element granularity) as (name, kind, offset, size)."""
    import math

    if schema.get("granularity") == "element":
        return [{"name": t["name"], "kind": "x".join(map(str, t["shape"])), "offset": int(t["offset"]),
                 "size": int(math.prod(t["shape"]))} for t in schema.get("tensors") or []]
    return [{"name": g["name"], "kind": g["kind"], "offset": int(g["offset"]), "size": int(g["size"])}
            for g in schema.get("groups") or []]


def _metrics_from_state(state: dict, num_units: int) -> dict:
    """The keys of ``ContinualLearner.metrics()`` that the summary tables use, from ``state.json``."""
    from anpyc.metrics import continual_metrics

    hist = state.get("history") or []
    done = [r for r in state.get("tasks") or [] if r.get("done")]
    R = state.get("acc_test") or []
    return {
        "tasks": [{"id": r["id"], "name": r["name"], "classes": r["classes"]} for r in done],
        "accuracy_matrix": R, **(continual_metrics(R) if R else {}),
        "capacity": [h["capacity"] for h in hist], "capacity_params": [h["capacity_params"] for h in hist],
        "owned_units": [h["owned_units"] for h in hist], "task_params": [h["params"] for h in hist],
        "task_flops": [h["flops"] for h in hist], "prune": [h["prune"] for h in hist],
        "seconds": [h["seconds"] for h in hist], "num_units": num_units,
        "dense_params": hist[-1]["dense_params"] if hist else None,
        "dense_flops": hist[-1]["dense_flops"] if hist else None,
    }


def command(
    run: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Run directory (what --out was).")],
    groups: Annotated[bool, typer.Option("--groups/--no-groups", help="The table of units per group/layer.")] = True,
    plots: Annotated[bool, typer.Option("--plots", help="Also (re)write the PNG plots into RUN/plots.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    import json

    import torch
    from rich.text import Text

    from anpyc.errors import StateFileError
    from anpyc.fileio import read_json
    from anpyc.tensorio import load_tensors
    from anpyc.maskfile import MASKS_FORMAT, MASKS_READS, check_masks, schema_tasks
    from anpyc.masks import FREE
    from anpyc.rundir import RunDir
    from anpyc.runfiles import check_state

    from .._common import console, printable
    from ..report import BlockedTable, Col, fmt_count, headline, task_table, titled

    rd = RunDir(run, create=False, lock=False)
    manifest = rd.manifest()  # every field checked (anpyc.runfiles)
    state_dir = rd.state_dir()  # checks that every committed file is present, unchanged and listed
    state = check_state(read_json(state_dir / "state.json", what="run state"), f"run state {state_dir / 'state.json'}",
                        manifest)
    mask_path = state_dir / "masks.safetensors"
    tensors, meta = load_tensors(mask_path, fmt=MASKS_FORMAT, versions=MASKS_READS)
    schema = meta.get("schema")
    check_masks(tensors, schema, mask_path)  # owners of the right length and dtype, each a recorded task or free
    if len(schema_tasks(schema)) != len(state["tasks"]):
        raise StateFileError(f"mask file {mask_path} records {len(schema_tasks(schema))} task(s), the run state "
                             f"{len(state['tasks'])}", "restore the run directory from a backup, or re-train")
    owners = tensors["owners"].to(torch.long)
    n_units = int(owners.numel())
    records = state.get("tasks") or []
    metrics = _metrics_from_state(state, n_units)
    metrics.update(method=(manifest.get("config") or {}).get("method"),
                   backbone=(manifest.get("backbone") or {}).get("name"))
    segments = _segments(schema)
    free_code = int(schema.get("free", FREE))
    base = {g.get("name"): g.get("size") for g in manifest.get("layout") or [] if isinstance(g, dict)}
    growth = [e for e in manifest.get("growth") or [] if isinstance(e, dict)]
    per_group = []
    for seg in segments:
        o = owners[seg["offset"]: seg["offset"] + seg["size"]]
        counts = {r["id"]: int((o == r["index"]).sum()) for r in records}
        per_group.append({**seg, "owned": counts, "free": int((o == free_code).sum()),
                          "base_size": base.get(seg.get("name"), seg["size"])})
    free = int((owners == free_code).sum())
    cursor = state.get("cursor") or {}
    files = manifest.get("files") or {}
    mask_info = {"path": str(mask_path), "bytes": mask_path.stat().st_size,
                 "sha256": files.get("masks.safetensors"), "format": meta.get("format"), "version": meta.get("version"),
                 "granularity": schema.get("granularity"), "units": n_units, "dtype": str(tensors["owners"].dtype),
                 "free_code": free_code, "tasks": schema_tasks(schema), "free_units": free,
                 "fingerprint": schema.get("fingerprint")}
    owned_now = {r["id"]: int((owners == r["index"]).sum()) for r in records}

    if plots:
        from ..plots import write_plots

        written = write_plots(metrics, run / "plots")
    if as_json:
        typer.echo(json.dumps({"run": str(run), "generation": manifest.get("generation"),
                               "backbone": manifest.get("backbone"), "input_spec": manifest.get("input_spec"),
                               "method": metrics["method"], "cursor": cursor, "tasks": records,
                               "owned_units": owned_now, "free_units": free, "groups": per_group, "masks": mask_info,
                               "growth": growth,
                               "metrics": metrics}, indent=2))
        return

    con = console()
    bb = manifest.get("backbone") or {}
    spec = manifest.get("input_spec") or {}
    kw = ", ".join(f"{k}={v}" for k, v in (bb.get("kwargs") or {}).items())
    con.print(Text.assemble(("run ", "bold"), str(run), f"  (generation {manifest.get('generation')}, "
                            f"anpyc {manifest.get('anpyc_version')})"))
    con.print(printable(f"backbone {bb.get('name')}{'(' + kw + ')' if kw else ''}, input {spec.get('kind')} "
              f"{'x'.join(map(str, spec.get('shape') or []))}, method {metrics['method']}, "
              f"{schema.get('granularity')} granularity: {n_units:,} units in {len(segments)} "
              f"{'tensors' if schema.get('granularity') == 'element' else 'groups'}"), highlight=False, markup=False)
    if isinstance(bb.get("weights"), dict):
        from anpyc.weights import describe_weights

        con.print(describe_weights(bb["weights"]), highlight=False, markup=False)
    finished = sum(1 for r in records if r.get("done"))
    status = f"{finished} task(s) finished"
    if cursor and cursor.get("phase") not in (None, "done"):
        status += f"; in progress: task {cursor.get('task')} ({cursor.get('phase')}, epoch {cursor.get('epoch', '-')})"
    con.print(status + f"; capacity left: {free:,} units ({100 * free / max(n_units, 1):.1f}%) free for new tasks",
              highlight=False)
    con.print()
    if metrics["tasks"]:
        con.print(task_table(metrics))
        con.print()
    if groups and segments and records:
        kind = "tensor" if schema.get("granularity") == "element" else "group"
        rows = [[Text(printable(g["name"])), Text(printable(g["kind"])), f"{g['size']:,}",
                 *(f"{g['owned'][r['id']]:,}" for r in records), f"{g['free']:,}"] for g in per_group]
        rows.append([Text("total", style="bold"), "", f"{n_units:,}",
                     *(Text(f"{owned_now[r['id']]:,}", style="bold") for r in records),
                     Text(f"{free:,}", style="bold")])
        lead = [Col(kind, justify="left", fold=True), Col("kind" if kind == "group" else "shape", justify="left"),
                Col("units")]
        table = BlockedTable(lead, [Col(str(r["id"])) for r in records] + [Col("free")], rows)
        con.print(titled(f"units owned per {kind} (columns: task ids; a task's subnetwork is every unit owned by it or "
                         "an earlier task)", table))
        con.print()
    if growth:
        by_task: dict[int, list[dict]] = {}
        for e in growth:
            by_task.setdefault(int(e.get("task", -1)), []).append(e)
        rows = [[str(t), str(len(es)), f"{sum(int(e.get('units', 0)) for e in es):,}",
                 Text(printable(", ".join(f"{e.get('group')} +{e.get('units')} -> {e.get('width')}" for e in es)))]
                for t, es in sorted(by_task.items())]
        grown = [g for g in per_group if g["size"] != g["base_size"]]
        con.print(titled(f"growth: {len(growth)} widening(s), {sum(g['size'] - g['base_size'] for g in grown):,} "
                         f"units added to {len(grown)} of {len(per_group)} groups (units {n_units:,}, before growth "
                         f"{sum(g['base_size'] for g in per_group):,})",
                         BlockedTable([Col("task"), Col("groups"), Col("units")],
                                      [Col("widened to", justify="left", fold=True)], rows)))
        con.print()
    con.print(Text.assemble(("mask file ", "bold"), f"{mask_path.relative_to(run)}: {fmt_count(mask_info['bytes'])}B, "
                            f"{mask_info['format']} v{mask_info['version']}, {n_units:,} x {mask_info['dtype']} owners "
                            f"({mask_info['free_code']} = free), tasks {mask_info['tasks']}, sha256:"
                            f"{str(mask_info['sha256'])[:12]} (verified)"))
    if metrics["tasks"]:
        con.print(headline(metrics))
    if plots:
        con.print(f"plots: {', '.join(str(p) for p in written)}" if written else "plots: no finished task to plot",
                  markup=False,
                  highlight=False)
