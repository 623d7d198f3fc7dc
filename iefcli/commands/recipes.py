"""`ief recipes`: list the built-in recipes, one line each."""

from __future__ import annotations

import typer

from iefcli.commands._common import cli_errors, out


def recipes() -> None:
    """List the built-in recipes (use a name with `ief train NAME`)."""
    from iefcli.train.recipe import builtin_recipes

    with cli_errors():
        items = builtin_recipes()
        width = max((len(n) for n, _, _ in items), default=0)
        for name, desc, _ in items:
            out.print(f"{name:<{width}}  {desc}", highlight=False, markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("recipes")(recipes)
