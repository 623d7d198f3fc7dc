"""The `ief` command line: commands only (parse, call one function, map errors)."""

from __future__ import annotations

import importlib
from typing import Annotated, Optional

import typer

from iefcli import __version__

app = typer.Typer(
    name="ief",
    help="Train and evaluate models with the improved empirical Fisher (iEF) natural-gradient optimiser.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Command modules, in --help order. Each defines register(app).
COMMAND_MODULES = ("train", "recipes", "eval_gamma", "compare", "plot", "export", "demo", "data", "bench")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ief {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Train and evaluate models with the improved empirical Fisher (iEF) natural-gradient optimiser."""


# A module that fails to import is a bug and raises here; an optional extra a
# command needs is imported (and its absence reported) inside that command.
for _name in COMMAND_MODULES:
    importlib.import_module(f"iefcli.commands.{_name}").register(app)


if __name__ == "__main__":  # pragma: no cover
    app()
