"""`ief export RUN --out DIR`: a trained run as a peft adapter, a transformers model, or a state dict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from iefcli.commands._common import cli_errors


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        run: Annotated[Path, typer.Argument(help="A run directory written by `ief train`.", show_default=False)],
        out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write (created; must be new or empty).")],
        checkpoint: Annotated[str, typer.Option(help="best, last, or a step number.")] = "best",
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export in --out.")] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Print what was written as JSON on stdout.")] = False,
    ) -> None:
        """Export a run's checkpoint for other tools.

        LoRA / prompt-tuning runs become a peft adapter (adapter_config.json +
        adapter_model.safetensors; load with PeftModel.from_pretrained(base, DIR));
        full Hugging Face models are written with save_pretrained; other models
        as model.safetensors (the full state_dict) with the run's recipe.yaml.
        Exit codes: 0 ok, 2 bad run directory or --out.
        """
        from iefcli.hf.export import export_run
        from iefcli.train.jsonout import dumps, json_errors

        with cli_errors(), json_errors(json_out, "export"):
            manifest = export_run(run_dir=run, out=out, checkpoint=checkpoint, overwrite=overwrite)
        if json_out:
            typer.echo(dumps(manifest), nl=False)
        else:
            typer.echo(f"exported {manifest['format']} ({manifest['recipe']}, step {manifest['step']}) to {out}", err=True)
