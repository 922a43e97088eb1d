"""One OUT, one run: a second `train run` on a live run's OUT is refused in one line naming the
holder; a dead run's lease is taken over."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner
from support import quick_train_args

from cache_format.errors import UserError
from train.cli import cli
from train.outdir import LEASE, OutLease

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
