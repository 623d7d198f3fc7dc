"""`--json` on a failed command prints a JSON error object (not 0 bytes); versions stamp every JSON object."""

from __future__ import annotations

import json

import typer
import yaml
from typer.testing import CliRunner

import iefcli
from iefcli.train.jsonout import SCHEMA_VERSION, dumps, error_object, stamp

runner = CliRunner()


def _app() -> typer.Typer:
    """The real `ief` app."""
    from iefcli.cli import app

    return app


def _train_args(recipe, out, *rest):
    return ["train", recipe, "--out", out, "-q", *rest]


def test_bad_recipe_gives_a_json_error_object(tmp_path):
    res = runner.invoke(_app(), _train_args("quickstart", str(tmp_path / "run"), "--set", "optimizer.lr=-1", "--json"))
    assert res.exit_code == 2
    obj = json.loads(res.stdout)
    assert obj["status"] == "error" and obj["command"] == "train"
    assert obj["error"]["type"] == "UsageError" and obj["error"]["exit_code"] == 2
    assert "optimizer.lr: must be > 0" in obj["error"]["message"]
    assert obj["iefcli_version"] == iefcli.__version__ and obj["schema_version"] == SCHEMA_VERSION
    assert "summary" not in obj
    assert res.stderr.startswith("ief: error: ") and res.stderr.count("\n") == 1
    # without --json: nothing on stdout
    res = runner.invoke(_app(), _train_args("quickstart", str(tmp_path / "run"), "--set", "optimizer.lr=-1"))
    assert res.exit_code == 2 and res.stdout == ""


def test_diverged_run_error_object_carries_the_summary(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"device": "cpu", "model": {"kind": "mlp", "sizes": [4]},
                                      "optimizer": {"name": "sgd", "lr": 1e38},
                                      "train": {"steps": 5, "batch_size": 64, "max_bad_steps": 1}}))
    res = runner.invoke(_app(), _train_args(str(recipe), str(tmp_path / "run"), "--json"))
    assert res.exit_code == 1, res.output
    obj = json.loads(res.stdout)
    assert obj["error"]["type"] == "RunFailed" and obj["error"]["exit_code"] == 1
    assert obj["summary"]["status"] == "failed"


def test_success_is_stamped(tmp_path):
    res = runner.invoke(_app(), _train_args("quickstart", str(tmp_path / "run"), "--json", "--set", "train.steps=2",
                                               "--set", "device=cpu"))
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    assert obj["schema_version"] == SCHEMA_VERSION and obj["status"] == "completed"
    assert list(obj)[:2] == ["iefcli_version", "schema_version"]


def test_error_object_pure():
    e = KeyboardInterrupt()
    obj = error_object(e, command="bench")
    assert obj["error"] == {"type": "KeyboardInterrupt", "message": "KeyboardInterrupt", "exit_code": 130}
    assert stamp({"schema_version": 7})["schema_version"] == 7  # the object's own keys win
    assert json.loads(dumps({"x": float("nan")})) == {"x": None}


def test_error_object_message_has_the_stderr_bound():
    """A huge multi-line message (a value echoed in an error) is one line of at most
    MAX_ERROR_CHARS in the JSON object too, keeping its start (the key) and its end (the rule)."""
    from iefcli.errors import MAX_ERROR_CHARS, UsageError

    e = UsageError("r.yaml: data.path: \n" + "x" * 5000 + "\nmust be a file")
    msg = error_object(e, command="train")["error"]["message"]
    assert "\n" not in msg and len(msg) <= MAX_ERROR_CHARS
    assert msg.startswith("r.yaml: data.path:") and msg.endswith("must be a file")
