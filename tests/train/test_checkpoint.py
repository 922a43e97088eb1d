"""Checkpoints hold no pickle: safetensors for tensors, JSON for the rest, and a planted pickle runs nothing."""

import json
import os
import shutil

import numpy as np
import torch
from click.testing import CliRunner
from safetensors import safe_open
from support import quick_train_args

from cache_format.errors import UserError
from train.cli import cli
from train.outdir import Checkpoints


def run(args):
    return CliRunner().invoke(cli, ["run", *args], catch_exceptions=True)


def test_the_state_round_trips_exactly_without_pickle(tmp_path):
    w = torch.randn(64, 16).T  # transposed in memory, as W_enc and its Adam moments are
    state = {
        "saes": {
            "a": {"W": w, "step": torch.tensor(3.0), "ids": torch.arange(5), "bits": torch.ones(3, dtype=torch.bool)}
        },
        "opt": {
            "state": {0: {"m": torch.zeros(2)}, 1: {}},
            "param_groups": [{"betas": (0.9, 0.999), "params": [0, 1]}],
        },
        "history": {"a": [{"variance_explained": float("nan"), "l0": np.float32(2.5).item(), "tokens": 2**40}]},
        "tricky": {"__tensor__": "not a tensor"},
        "run_id": "x",
        "none": None,
    }
    ckpts = Checkpoints(tmp_path / "ck")
    path = ckpts.save(state, 256, 0.5)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [path.name, path.with_suffix(".safetensors").name]
    json.loads(path.read_text())  # plain JSON
    with safe_open(str(path.with_suffix(".safetensors")), "pt") as f:
        assert len(list(f.keys())) == 5
    got = Checkpoints.load(path)
    assert torch.equal(got["saes"]["a"]["W"], w) and got["saes"]["a"]["W"].stride() == w.stride()
    assert got["saes"]["a"]["bits"].dtype == torch.bool and got["saes"]["a"]["step"].shape == ()
    assert list(got["opt"]["state"]) == [0, 1] and got["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert np.isnan(got["history"]["a"][0]["variance_explained"]) and got["history"]["a"][0]["tokens"] == 2**40
    assert got["tricky"] == {"__tensor__": "not a tensor"} and got["none"] is None


def _marker_pickle(path, marker):
    """A torch file whose unpickling runs a command (what weights_only=False would do)."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"saes": Payload(), "tokens": 10**6}, path)


def test_a_planted_pickle_runs_nothing_on_resume(make_cache, tmp_path):
    url, _ = make_cache(segments=(400, 400), d_model=16)
    out = tmp_path / "out"
    assert run(quick_train_args(url, out)).exit_code == 0
    ck = out / "checkpoints"
    state = json.loads((out / "run_state.json").read_text())
    (out / "run_state.json").write_text(json.dumps(dict(state, complete=False)))  # killed before the end
    marker = tmp_path / "pwned"

    # a directory of pickles only, as an older version wrote them: refused in one line
    shutil.move(ck, tmp_path / "real")
    ck.mkdir()
    _marker_pickle(ck / "tokens_000000000000384.pt", marker)
    (ck / "tokens_000000000000384.json").write_text(json.dumps({"tokens": 384, "score": None}))
    r = run(quick_train_args(url, out))
    assert isinstance(r.exception, UserError) and "pickled checkpoints" in str(r.exception)
    assert "--fresh" in str(r.exception) and "\n" not in str(r.exception)
    assert not marker.exists()

    # beside real checkpoints, a newer pickle is not even looked at: the run resumes from them
    for f in (tmp_path / "real").iterdir():
        shutil.copy(f, ck / f.name)
    r = run(quick_train_args(url, out))
    assert r.exit_code == 0, repr(r.exception)
    assert "resuming" in r.output and not marker.exists()

    # the plant is live: loading it the old way runs its command
    torch.load(ck / "tokens_000000000000384.pt", weights_only=False)
    assert marker.exists()


def test_a_damaged_checkpoint_is_one_line(make_cache, tmp_path):
    url, _ = make_cache(segments=(400, 400), d_model=16)
    out = tmp_path / "out"
    assert run(quick_train_args(url, out)).exit_code == 0
    state = json.loads((out / "run_state.json").read_text())
    (out / "run_state.json").write_text(json.dumps(dict(state, complete=False)))
    (latest,) = sorted((out / "checkpoints").glob("tokens_*512.json"))
    body = json.loads(latest.read_text())
    body["state"]["saes"] = {"__tensor__": "no such tensor"}
    latest.write_text(json.dumps(body))
    r = run(quick_train_args(url, out))
    assert isinstance(r.exception, UserError) and "not a readable checkpoint" in str(r.exception)
    assert "\n" not in str(r.exception)
