"""The `ief` command line: commands only (parse, call one function, map errors)."""

from __future__ import annotations

import importlib
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from iefcli import __version__


class OneLineUsageErrors(TyperGroup):
    """Parser-level usage errors (unknown option, missing argument, bad value) as ONE
    stderr line ``ief: error: <command>: <problem>`` with click's exit code (2), instead of
    Typer's boxed usage block; a Ctrl-C outside a command's own handler exits 130 quietly."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        import sys

        from typer.core import _click as click  # typer's own (vendored) click
        from typer.exceptions import Abort

        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            from iefcli.commands._common import one_line

            ctx = getattr(e, "ctx", None)
            where = f"{ctx.command_path}: " if ctx is not None and ctx.command_path else ""
            print(f"ief: error: {one_line(where + e.format_message())}", file=sys.stderr)
            sys.exit(e.exit_code)
        except (Abort, KeyboardInterrupt):
            print("ief: error: interrupted", file=sys.stderr)
            sys.exit(130)
        code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
        comm = sys.modules.get("iefcli.dist.comm")  # loaded only when the command used torch.distributed
        if comm is not None and code == 0:
            comm.finished()  # a clean exit: meet the other ranks before the process group goes
        sys.exit(code)


app = typer.Typer(
    cls=OneLineUsageErrors,
    name="ief",
    help="Train and evaluate models with the improved empirical Fisher (iEF) natural-gradient optimiser.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Command modules, in --help order. Each defines register(app).
COMMAND_MODULES = ("train", "recipes", "eval_gamma", "compare", "plot", "export", "demo", "data", "bench", "reproduce")


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
    from iefcli import allocator

    allocator.tune_cpu_allocator()  # freed tensors stay with the process (glibc; IEF_CPU_ALLOCATOR=system: unchanged)


# A module that fails to import is a bug and raises here; an optional extra a
# command needs is imported (and its absence reported) inside that command.
for _name in COMMAND_MODULES:
    importlib.import_module(f"iefcli.commands.{_name}").register(app)


if __name__ == "__main__":  # pragma: no cover
    app()
