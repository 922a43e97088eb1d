"""A run's OUT (train.outdir).

One OUT, one run: a second `train run` on a live run's OUT is refused in one line naming the
holder; a dead run's lease is taken over.

`--fresh` deletes only what the previous run in OUT wrote: a name `run_state.json` lists is
confined to OUT before anything is deleted.

run.json is read through one place, and the SAE directories it lists stay inside the run.

Checkpoints hold no pickle: safetensors for tensors, JSON for the rest, and a planted pickle runs nothing.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from support import quick_train_args

from cache_format.errors import UserError
from train.cli import cli
from train.outdir import LEASE, Checkpoints, OutLease, read_run, run_saes, write_run_json

ROOT = Path(__file__).resolve().parents[2]


def run(args):
    return CliRunner().invoke(cli, ["run", *args], catch_exceptions=True)


def _holder_pid(out: Path) -> int | None:
    try:
        return json.loads((out / LEASE).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_a_second_run_on_a_live_runs_out_is_refused_and_a_dead_runs_lease_is_taken_over(make_cache, tmp_path):
    url, _ = make_cache(segments=(400, 400), d_model=16)
    out = tmp_path / "out"
    # the first run has a budget it will not finish here: it lives until it is killed
    first = subprocess.Popen(
        [sys.executable, "-m", "train", "run", *quick_train_args(url, out, tokens=10**9)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while _holder_pid(out) != first.pid and time.time() < deadline:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.1)
        r = run(quick_train_args(url, out))
        assert isinstance(r.exception, UserError), repr(r.exception)
        msg = str(r.exception)
        assert f"process {first.pid} on host {socket.gethostname()}" in msg and "\n" not in msg
        assert first.poll() is None  # the refused run changed nothing the first one needs
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # its lease died with it: the next run takes it over (another budget: a different run, so --fresh)
    r = run([*quick_train_args(url, out), "--fresh"])
    assert r.exit_code == 0, repr(r.exception)
    assert _holder_pid(out) == os.getpid() and (out / "run.json").exists()


def test_the_lease_is_exclusive_and_released(tmp_path):
    with OutLease(tmp_path / "out"):
        try:
            OutLease(tmp_path / "out")
            raise AssertionError("a second lease was granted")
        except UserError as e:
            assert f"process {os.getpid()}" in str(e)
    OutLease(tmp_path / "out").release()  # free again


def test_a_planted_lease_link_is_not_followed(tmp_path):
    out, target = tmp_path / "out", tmp_path / "precious.txt"
    out.mkdir()
    target.write_text("keep me")
    (out / LEASE).symlink_to(target)
    try:
        OutLease(out)
        raise AssertionError("the lease went through a link")
    except UserError as e:
        assert "\n" not in str(e)
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("how", ["absolute", "dotdot", "link"])
def test_fresh_deletes_nothing_outside_out(make_cache, tmp_path, how):
    url, _ = make_cache(segments=(400, 400), d_model=16)
    out, victim = tmp_path / "out", tmp_path / "victim"
    assert run(quick_train_args(url, out)).exit_code == 0
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    name = {"absolute": str(victim), "dotdot": "../victim", "link": "link"}[how]
    if how == "link":
        os.symlink(victim, out / "link")
    state = json.loads((out / "run_state.json").read_text())
    (out / "run_state.json").write_text(json.dumps(dict(state, saes=[*state["saes"], name])))
    before = sorted(p.name for p in out.iterdir())

    r = run([*quick_train_args(url, out, tokens=256), "--fresh"])
    assert isinstance(r.exception, UserError), repr(r.exception)
    assert "run_state.json names" in str(r.exception) and "\n" not in str(r.exception)
    assert (victim / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == before  # refused before anything went


def test_an_unreadable_run_state_is_one_line(make_cache, tmp_path):
    url, _ = make_cache(segments=(400, 400), d_model=16)
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_state.json").write_text("[1, 2")
    r = run(quick_train_args(url, out))
    assert isinstance(r.exception, UserError) and "not a readable run state" in str(r.exception)


NAME = "L2_n32_k16"


@pytest.fixture
def two_runs(tmp_path):
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    for d in (mine, theirs):
        (d / NAME).mkdir(parents=True)
        (d / NAME / "cfg.json").write_text("{}")
        write_run_json(d, {"saes": [{"name": NAME, "path": NAME, "layer": 2}]})
    return mine, theirs


@pytest.mark.parametrize("how", ["absolute", "dotdot", "link", "dir key"])
def test_an_sae_directory_outside_the_run_is_refused(two_runs, how):
    mine, theirs = two_runs
    run = json.loads((mine / "run.json").read_text())
    (sae,) = run["saes"]
    if how == "absolute":
        sae["path"] = str(theirs / NAME)
    elif how == "dotdot":
        sae["path"] = f"../theirs/{NAME}"
    elif how == "link":
        (mine / "elsewhere").symlink_to(theirs / NAME)
        sae["path"] = "elsewhere"
    else:
        del sae["path"]
        sae["dir"] = str(theirs / NAME)
    (mine / "run.json").write_text(json.dumps(run))
    with pytest.raises(UserError, match="run.json names .* is refused") as e:
        run_saes(mine)
    assert "\n" not in str(e.value)


def test_saes_inside_the_run_are_found(two_runs):
    mine, _ = two_runs
    _, saes = read_run(mine)
    assert [s["dir"] for s in saes] == [mine / NAME]


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
