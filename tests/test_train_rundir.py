"""The run directory's one checkpoint loader and its atomic writers."""

from __future__ import annotations

import os

import pytest
import torch

from iefcli.errors import UsageError
from iefcli.train import rundir

OWN = {"a.w": torch.zeros(2, 3, dtype=torch.float64), "a.b": torch.zeros(3, dtype=torch.float64)}


def _ckpt(path, params):
    rundir.write_checkpoint(path, params=params, optimizer_state={}, trainer_state={"step": 0},
                            meta={"step": 0, "epoch": 0, "metrics": {}})
    return path


def test_load_params_exact_match_returns_own_dtype_and_order(tmp_path):
    saved = {"a.b": torch.arange(3.0), "a.w": torch.arange(6.0).reshape(2, 3)}
    ck = _ckpt(tmp_path / "ck", saved)
    got = rundir.load_params(OWN, ck)
    assert list(got) == list(OWN)
    assert all(v.dtype == torch.float64 for v in got.values())
    assert torch.equal(got["a.w"], saved["a.w"].double())
    # a run directory resolves to its best/ checkpoint
    run = tmp_path / "run"
    (run).mkdir()
    (run / rundir.RECIPE_FILE).write_text("{}\n")
    _ckpt(run / rundir.BEST_DIR, {k: v + 1 for k, v in saved.items()})
    assert torch.equal(rundir.load_params(OWN, run)["a.b"], saved["a.b"].double() + 1)


@pytest.mark.parametrize("saved, allow_missing, message", [
    ({"a.w": torch.zeros(2, 3)}, False, r"ck/params\.safetensors: parameter 'a\.b' of the model is missing"),
    ({"a.w": torch.zeros(2, 3), "a.b": torch.zeros(3), "x": torch.zeros(1)}, False,
     r"ck/params\.safetensors: parameter 'x' is not in the model"),
    ({"a.w": torch.zeros(2, 3), "x": torch.zeros(1)}, True, r"parameter 'x' is not in the model"),
    ({"a.w": torch.zeros(3, 2), "a.b": torch.zeros(3)}, False, r"a\.w has shape \(3, 2\), the model expects \(2, 3\)"),
    ({"a.w": torch.zeros(3, 2)}, True, r"a\.w has shape \(3, 2\), the model expects \(2, 3\)"),
])
def test_load_params_one_strictness_rule(tmp_path, saved, allow_missing, message):
    ck = _ckpt(tmp_path / "ck", saved)
    with pytest.raises(UsageError, match=r"^model\.init_from: .*" + message) as e:
        rundir.load_params(OWN, ck, where="model.init_from", allow_missing=allow_missing)
    assert "\n" not in str(e.value)


def test_load_params_partial_and_missing_file(tmp_path):
    ck = _ckpt(tmp_path / "ck", {"a.w": torch.ones(2, 3)})
    got = rundir.load_params(OWN, ck, allow_missing=True)
    assert list(got) == ["a.w"] and got["a.w"].dtype == torch.float64
    with pytest.raises(UsageError, match=r"^--checkpoint: .*nope: checkpoint or run directory not found$"):
        rundir.load_params(OWN, tmp_path / "nope", where="--checkpoint")
    (ck / rundir.PARAMS_FILE).write_bytes(b"garbage")
    with pytest.raises(UsageError, match=r"params\.safetensors: corrupt parameters file"):
        rundir.load_params(OWN, ck)


def test_run_directory_is_readable_by_the_group(tmp_path):
    """Every file and directory `ief train` writes has the usual modes under the
    umask (0644 / 0755 under 022), as open()/mkdir() give: never tempfile's 0600/0700."""
    import json

    import yaml
    from typer.testing import CliRunner

    from iefcli.cli import app

    recipe = {"name": "perm", "seed": 0, "device": "cpu", "model": {"kind": "mlp", "sizes": [4]},
              "data": {"kind": "digits"}, "optimizer": {"name": "sgd", "lr": 0.1},
              "train": {"steps": 3, "batch_size": 64, "eval_every": 2, "checkpoint_every": 2}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    old = os.umask(0o022)
    try:
        res = CliRunner().invoke(app, ["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"), "-q"])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    paths = [run, *run.rglob("*")]
    assert {p.relative_to(run).as_posix() for p in paths if p.is_dir()} >= {".", "best", "checkpoints", "checkpoints/step-3"}
    for p in paths:
        want = 0o755 if p.is_dir() else 0o644
        assert (p.stat().st_mode & 0o777) == want, f"{p}: {oct(p.stat().st_mode & 0o777)}"
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_atomic_writers_respect_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        rundir.atomic_write_text(tmp_path / "a.txt", "x")
        with rundir.atomic_dir(tmp_path / "d") as tmp:
            rundir.atomic_write_bytes(tmp / "b", b"y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "d" / "b").read_bytes() == b"y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"]


def test_atomic_dir_leaves_the_old_directory_on_error(tmp_path):
    dest = tmp_path / "out"
    with rundir.atomic_dir(dest) as tmp:
        rundir.atomic_write_text(tmp / "f", "old")
    with pytest.raises(RuntimeError):
        with rundir.atomic_dir(dest) as tmp:
            rundir.atomic_write_text(tmp / "f", "new")
            raise RuntimeError("killed")
    assert (dest / "f").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with rundir.atomic_dir(dest) as tmp:
        rundir.atomic_write_text(tmp / "f", "new")
    assert (dest / "f").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]
