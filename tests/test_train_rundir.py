"""The run directory's one checkpoint loader and its atomic writers."""

from __future__ import annotations

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
