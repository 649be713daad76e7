"""The typer command-line interface (``anpyc``); see :mod:`anpyc.cli.app`."""
