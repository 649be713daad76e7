"""Check a backbone before a long run: does it walk into units, mask per task and export to ONNX with parity?

Exit code 0 when it does and at least ``--min-prunable`` of the trunk's parameters are in maskable groups, 1 when
not (the reason is printed: the failing stage, or how much is maskable and why the rest was rejected; ``--explain``
lists every rejected group with the tensor where parity broke), 2 for a bad name or option. What the exporter
and other libraries print goes to ``export.log`` (``--verbose`` shows it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v) if v else "-"
    return str(v)


def _rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The checker's report as labelled lines; known keys are summarised, unknown ones printed as they are."""
    from ..report import fmt_count

    rows: list[tuple[str, str]] = [("model", str(result.get("model")))]
    shown = {"model", "ok", "reason"}

    def add(label: str, keys: tuple[str, ...], text: str) -> None:
        if all(k in result for k in keys):
            rows.append((label, text))
        shown.update(keys)

    kinds = result.get("group_kinds") or {}
    add("input size", ("img_size",), str(result.get("img_size")))
    add("unit groups", ("groups",), f"{result.get('groups')}" + (f" ({', '.join(f'{k} {v}' for k, v in kinds.items())})"
                                                                 if kinds else ""))
    shown.add("group_kinds")
    rej = result.get("rejected")
    if isinstance(rej, dict):
        reasons = ", ".join(f"{k} x{v}" for k, v in (rej.get("reasons") or {}).items())
        add("rejected groups", ("rejected",), f"{rej.get('count', 0)}" + (f" ({reasons})" if reasons else ""))
    else:
        add("rejected groups", ("rejected",), _fmt(rej))
    add("units", ("units",), f"{result.get('units'):,}" if isinstance(result.get("units"), int) else
        _fmt(result.get("units")))
    if "prunable_fraction" in result:
        need = result.get("min_prunable")
        add("prunable", ("prunable_fraction",), f"{100 * float(result['prunable_fraction']):.0f}% of the trunk's "
            "parameters are in maskable groups" + (f" (required: {100 * float(need):.0f}%)" if need is not None
                                                    else ""))
    shown.update(("min_prunable", "rejected_groups", "log"))
    unmasked = result.get("unmasked") or []
    if unmasked and float(result.get("prunable_fraction", 1.0)) < 1.0:
        add("largest unmasked", ("unmasked",), ", ".join(f"{u['tensor']} {100 * u['share']:.0f}%"
                                                          for u in unmasked[:3]))
    shown.add("unmasked")
    dense_p, dense_f = result.get("dense_params"), result.get("dense_flops")
    add("params per task", ("params_per_task",), ", ".join(fmt_count(v) for v in result.get("params_per_task") or [])
        + (f" (dense {fmt_count(dense_p)})" if dense_p else ""))
    shown.add("dense_params")
    if "flops_per_task" in result:
        add("FLOPs per task", ("flops_per_task",), ", ".join(fmt_count(v) for v in result["flops_per_task"] or [])
            + (f" (dense {fmt_count(dense_f)})" if dense_f else ""))
    shown.add("dense_flops")
    add("ONNX parity", ("parity",), _fmt(result.get("parity")) + " (max abs diff, onnxruntime vs masked torch)")
    add("exporter", ("exporter",), _fmt(result.get("exporter")))
    if not result.get("ok"):
        add("failed at", ("stage",), str(result.get("stage")))
    shown.add("stage")
    add("seconds", ("seconds",), _fmt(result.get("seconds")))
    rows += [(k, _fmt(v)) for k, v in result.items() if k not in shown]
    return rows


def command(
    model: Annotated[str, typer.Argument(help="Backbone name (any timm model, or mlp/cnn; see `anpyc models`).")],
    img_size: Annotated[Optional[int], typer.Option("--img-size", help="Input side in pixels \\[default: the "
                                                    "checker's choice for the model].")] = None,
    tasks: Annotated[int, typer.Option("--tasks", help="Synthetic tasks to learn and export.")] = 2,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Training steps per task \\[default: the "
                                                 "checker's].")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", file_okay=False, help="Keep the run and the export here "
                                                "\\[default: a temporary folder].")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch/onnxruntime threads.")] = None,
    min_prunable: Annotated[float, typer.Option("--min-prunable", help="Share of the trunk's parameters that must "
                                                "be in maskable groups for the check to pass (0..1).")] = 0.5,
    explain: Annotated[bool, typer.Option("--explain", help="List every rejected group: the tensor where "
                                          "masked and sliced outputs first differed, by how much, and why.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show what the exporter and other libraries "
                                          "print (otherwise only in export.log).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    if img_size is not None and img_size < 1:
        raise typer.BadParameter("img-size must be >= 1", param_hint="--img-size")
    if tasks < 1:
        raise typer.BadParameter("tasks must be >= 1", param_hint="--tasks")
    if threads is not None and threads < 1:
        raise typer.BadParameter("threads must be >= 1", param_hint="--threads")
    if steps is not None and steps < 1:
        raise typer.BadParameter("steps must be >= 1", param_hint="--steps")
    if not 0.0 <= min_prunable <= 1.0:
        raise typer.BadParameter(f"min-prunable is a share between 0 and 1, not {min_prunable:g}",
                                 param_hint="--min-prunable")

    import json

    try:
        from anpyc.apps.check import check_model
    except ModuleNotFoundError as e:  # a missing part of this installation, not a user error: keep the traceback
        if e.name != "anpyc.apps.check":
            raise
        raise RuntimeError("anpyc check needs anpyc.apps.check, which this installation lacks") from e
    from anpyc.adapters.backbones import create_backbone, is_known

    from .._common import console

    if not is_known(model):
        create_backbone(model)  # raises ModelError naming close matches
    from anpyc.quiet import LOG_NAME, library_output

    kwargs: dict[str, Any] = {"img_size": img_size, "num_tasks": tasks, "out_dir": out, "min_prunable": min_prunable}
    if steps is not None:
        kwargs["steps"] = steps
    if threads is not None:
        kwargs["threads"] = threads
    if out is not None:
        log = out / LOG_NAME
    else:  # the check's files go with its temporary folder; its log stays for reading afterwards
        import tempfile

        log = Path(tempfile.mkdtemp(prefix="anpyc-check-")) / LOG_NAME
    with library_output(log, verbose=verbose, title=f"anpyc check {model}"):
        result = check_model(model, **kwargs)
    result["log"] = str(log)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        from rich.table import Table
        from rich.text import Text

        con = console()
        table = Table(show_header=False, show_edge=False, pad_edge=False, box=None)
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        for label, value in _rows(result):
            table.add_row(Text(label), Text(value))
        con.print(table)
        if explain:
            from anpyc.structure import explain_rejected

            lines = explain_rejected(result.get("rejected_groups") or [])
            con.print(Text(f"rejected groups ({len(lines)}):" if lines else "rejected groups: none", style="bold"))
            for line in lines:
                con.print(Text("  " + line), soft_wrap=True)
        con.print(Text(f"library messages: {log}"), soft_wrap=True)
        if result.get("ok"):
            con.print(Text.assemble(("OK", "green"), f": {model} walks, masks and exports cleanly"))
        else:
            con.print(Text.assemble(("NOT OK", "red"), f": {model}: {result.get('reason') or 'no reason given'}"))
    if not result.get("ok"):
        raise typer.Exit(code=1)
