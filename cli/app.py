"""The ``anpyc`` command: a thin typer layer over the public Python API, one module per command."""

from __future__ import annotations

import importlib

import typer

from ._common import user_errors

app = typer.Typer(
    name="anpyc",
    help="Continual learning on any timm/torch backbone; each task exported as its own small ONNX model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (command name, module under anpyc.cli.commands); each module defines ``command``.
COMMANDS: tuple[tuple[str, str], ...] = (
    ("quickstart", "quickstart"),
    ("train", "train"),
    ("eval", "eval"),
    ("inspect", "inspect"),
    ("export", "export"),
    ("predict", "predict"),
    ("serve", "serve"),
    ("models", "models"),
    ("check", "check"),
)

for _name, _module in COMMANDS:
    _mod = importlib.import_module(f"anpyc.cli.commands.{_module}")
    app.command(_name, help=_mod.__doc__)(user_errors(_mod.command))


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        from anpyc import __version__

        typer.echo(__version__)
        raise typer.Exit()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
