"""List the backbones anpyc can build: its own torch models (mlp, cnn) and every timm model, optionally filtered."""

from __future__ import annotations

from typing import Annotated, Optional

import typer


def command(
    pattern: Annotated[Optional[str], typer.Argument(help="Shell pattern or substring, e.g. 'resnet*' or 'mobilenet'.",
                                                     show_default=False)] = None,
    limit: Annotated[int, typer.Option("--limit", help="Print at most this many names (0: all).")] = 0,
) -> None:
    if limit < 0:
        raise typer.BadParameter("limit must be >= 0", param_hint="--limit")

    from rich.columns import Columns

    from anpyc.adapters.backbones import BACKBONES, list_backbones

    from .._common import console, fail

    names = list_backbones(pattern)
    if not names:
        raise fail(f"no model matches {pattern!r}", "try a shorter pattern, e.g. 'resnet*', or no pattern to list all")
    own = [n for n in names if n in BACKBONES]
    timm_names = [n for n in names if n not in BACKBONES]
    shown = names if not limit else names[:limit]
    con = console()
    if own:
        con.print("[bold]anpyc torch backbones[/bold]")
        for n in own:
            if n in shown:
                con.print(f"  {n:<6} {BACKBONES.describe(n)}", highlight=False, markup=False)
    rest = [n for n in timm_names if n in set(shown)]
    if rest:
        con.print(f"[bold]timm models[/bold] ({len(timm_names)}{' matching' if pattern else ''}; random init; "
                  "train --pretrained downloads timm's weights, --weights FILE loads yours)")
        con.print(Columns(rest, padding=(0, 2)))
    if limit and len(names) > limit:
        con.print(f"... {len(names) - limit} more (--limit 0 shows all)", highlight=False)
    con.print("check one before a long run: anpyc check NAME", style="dim", highlight=False)
