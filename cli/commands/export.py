"""Export each learned task of a run as its own ONNX model, parity-checked against the masked model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def command(
    run: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Run directory to export.")],
    task: Annotated[Optional[int], typer.Option("--task", help="Export only this task id.")] = None,
    all_tasks: Annotated[bool, typer.Option("--all", help="Export every learned task (the default).")] = False,
    out: Annotated[
        Optional[Path], typer.Option("--out", file_okay=False, help="Output folder \\[default: RUN/export].")
    ] = None,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset [default: the exporter's].")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Also write int8 models (task-NNN.int8.onnx).")] = False,
    threads: Annotated[int, typer.Option("--threads", help="onnxruntime threads for the checks.")] = 1,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show what the exporter and other libraries "
                                          "print (otherwise only in RUN/export.log).")] = False,
) -> None:
    if task is not None and all_tasks:
        raise typer.BadParameter("pass either --task N or --all, not both", param_hint="--task/--all")
    if opset is not None and not 7 <= opset <= 30:
        raise typer.BadParameter(f"opset {opset} is out of range; use 7..30 or leave it out", param_hint="--opset")
    if threads < 1:
        raise typer.BadParameter("threads must be >= 1", param_hint="--threads")

    from anpyc.export.exporter import CalibrationSource, export_all, tasks_to_export
    from anpyc.learner import ContinualLearner
    from anpyc.quiet import LOG_NAME, library_output

    learner = ContinualLearner.load(run)
    tasks_to_export(learner, None if task is None else [task])  # a bad id fails here, before the log is touched
    out_dir = out if out is not None else run / "export"
    log = run / LOG_NAME  # the run's log: the export folder holds only what is deployed
    with library_output(log, verbose=verbose, title=f"anpyc export {run}"):
        sidecars = export_all(learner, out_dir, tasks=None if task is None else [task], opset=opset, threads=threads)
    for s in sidecars:
        fallback = f" (fallback: {s['exporter_fallback_reason']})" if s["exporter_fallback_reason"] else ""
        typer.echo(f"task {s['task']} {s['name']!r}: {out_dir / s['file']}  exporter={s['exporter']}{fallback} "
                   f"opset={s['opset']} parity={s['parity']['max_abs_diff']:.2e} params={s['params']} "
                   f"flops={s['flops']}")
    if int8:
        from anpyc.errors import AnpycError
        from anpyc.export.quantize import compare_int8, quantize_task

        from ..sources import read_source

        source = read_source(run)  # the data the run recorded: calibration samples for static int8
        if source is not None:
            try:
                learner.attach(source.open(input_spec=learner.input_spec))
            except AnpycError as e:
                typer.echo(f"note: the run's data is not available ({e.one_line}); int8 falls back to dynamic")

        for s in sidecars:
            t = s["task"]
            calib = None
            if isinstance(learner, CalibrationSource) and learner.has_data(t):
                calib = learner.calibration_inputs(t, 64).detach().float().cpu().numpy()
            with library_output(log, verbose=verbose, title=f"int8 task {t}"):
                entry = quantize_task(out_dir, t, calibration=calib, threads=threads)
                r = (compare_int8(out_dir, t, calib, threads=threads, record=True, note="calibration inputs")
                     if calib is not None else None)
            if r is not None:
                typer.echo(f"task {t} int8 ({entry['mode']}): {out_dir / entry['file']}  "
                           f"top-1 agreement={r['top1_agreement']:.3f} speed-up={r['speedup']:.2f}x")
            else:
                typer.echo(f"task {t} int8 ({entry['mode']}, no calibration data from the run: MatMul/Gemm only): "
                           f"{out_dir / entry['file']}")
    typer.echo(f"manifest: {out_dir / 'manifest.json'}")
    typer.echo(f"library messages: {log}")
