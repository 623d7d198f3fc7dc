"""`ief recipes`: list the built-in recipes; `show NAME` (the resolved YAML), `copy NAME PATH`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from iefcli.commands._common import cli_errors, out, overwrite_option


def recipes(ctx: typer.Context) -> None:
    """List the built-in recipes (use a name with `ief train NAME`); `show` and `copy` below."""
    if ctx.invoked_subcommand is not None:
        return
    from iefcli.train.recipe import builtin_recipes

    with cli_errors():
        items = builtin_recipes()
        width = max((len(n) for n, _, _ in items), default=0)
        for name, desc, _ in items:
            out.print(f"{name:<{width}}  {desc}", highlight=False, markup=False, soft_wrap=True)


def show(
    name: Annotated[str, typer.Argument(help="A built-in recipe name or a recipe file.", show_default=False)],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key, as for `ief train`.")] = None,
) -> None:
    """Print a recipe fully resolved (extends merged, --set applied, defaults filled) as YAML."""
    from iefcli.train.extends import show_recipe

    with cli_errors():
        text = show_recipe(name, list(set_ or ()))
    typer.echo(text, nl=False)


def copy(
    name: Annotated[str, typer.Argument(help="A built-in recipe name or a recipe file.", show_default=False)],
    path: Annotated[Path, typer.Argument(help="Destination file, or a directory.", show_default=False)],
    overwrite: Annotated[bool, overwrite_option("an existing file")] = False,
) -> None:
    """Copy a recipe (comments kept) to PATH, to edit it."""
    from iefcli.train.extends import copy_recipe

    with cli_errors():
        dest = copy_recipe(name, path, overwrite=overwrite)
    typer.echo(f"wrote {dest}", err=True)


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="List the built-in recipes (use a name with `ief train NAME`).")
    group.callback(invoke_without_command=True)(recipes)
    group.command("show")(show)
    group.command("copy")(copy)
    app.add_typer(group, name="recipes")
