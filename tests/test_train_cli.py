"""The command layer: every command module is registered (none skipped), one style."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

import iefcli.commands
from iefcli import cli


def test_every_command_module_is_registered_and_listed():
    files = {p.stem for p in Path(iefcli.commands.__file__).parent.glob("*.py")} - {"__init__", "_common"}
    assert set(cli.COMMAND_MODULES) == files
    res = CliRunner().invoke(cli.app, ["--help"])
    assert res.exit_code == 0
    for name in cli.COMMAND_MODULES:
        assert name.replace("_", "-") in res.stdout, name


def test_a_command_module_that_fails_to_import_is_an_error_not_a_missing_command():
    """A broken command module raises when the CLI loads (a bug must not look like a missing command)."""
    code = (  # every finder sees the module as absent (a deleted or unbuildable file)
        "import sys\n"
        "orig = list(sys.meta_path)\n"
        "class Hide:\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'iefcli.commands.plot':\n"
        "            return None\n"
        "        for f in orig:\n"
        "            spec = f.find_spec(name, path, target)\n"
        "            if spec is not None:\n"
        "                return spec\n"
        "sys.meta_path[:] = [Hide()]\n"
        "import iefcli.cli\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode != 0 and "iefcli.commands.plot" in res.stderr, res.stderr
