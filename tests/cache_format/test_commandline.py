"""What the three command lines share (cache_format/commandline.py): `run_cli`'s one-line errors
(an OSError's advice follows its errno; a failure in a subprocess, and `--debug`'s traceback),
`--layers`, and one way to a dask client: a real LocalCluster of the asked shape, an existing
scheduler by address, one line for an unreachable one."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import click
import pytest

from cache_format.commandline import dask_client, parse_layers, run_cli
from cache_format.config import ConfigError
from cache_format.errors import UserError


@pytest.mark.parametrize(
    "code,advice,not_advice",
    [
        (errno.ENOSPC, "free some space", None),
        (errno.ENOTEMPTY, "another process", "free"),  # a race between two commands, not a full disk
        (errno.EACCES, "permissions", "free"),
        (errno.EIO, "check the path", "free"),
    ],
)
def test_an_os_error_is_one_line_whose_advice_fits_it(monkeypatch, capsys, code, advice, not_advice):
    @click.group()
    def cli():
        pass

    @cli.command()
    def go():
        raise OSError(code, os.strerror(code), "/some/dir/.heldout.tmp-1")

    monkeypatch.setattr(sys, "argv", ["prog", "go"])
    with pytest.raises(SystemExit) as e:
        run_cli(cli, "prog")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert advice in err and ".heldout.tmp-1" in err
    assert not_advice is None or not_advice not in err


def test_parse_layers():
    assert parse_layers("11,31,55") == [11, 31, 55] and parse_layers(None) is None
    with pytest.raises(ConfigError, match="comma-separated"):
        parse_layers("11,x")


def test_a_local_cluster_of_the_given_shape_runs_tasks_and_closes(tmp_path):
    with dask_client(n_workers=1, threads_per_worker=2) as client:
        assert sum(client.nthreads().values()) == 2
        assert client.submit(lambda x: x + 1, 41).result() == 42
    assert client.status == "closed"


def test_an_existing_scheduler_is_used_by_address():
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with dask_client(cluster.scheduler_address) as client:
            assert client.scheduler.address == cluster.scheduler_address
            assert client.submit(sum, [1, 2, 3]).result() == 6
        assert cluster.status.name == "running"  # closing the client leaves someone else's cluster up


def test_an_unreachable_scheduler_is_one_line_naming_the_fix():
    with pytest.raises(UserError) as e:
        with dask_client("tcp://127.0.0.1:9", fix="start one with `dask scheduler`"):
            pass
    msg = str(e.value)
    assert msg.startswith("cannot reach the dask scheduler at tcp://127.0.0.1:9 (") and "\n" not in msg
    assert msg.endswith("); start one with `dask scheduler`")


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["info", "{tmp}"], "is not a cache"),
        (["verify", "{tmp}/nothing"], "is not a cache"),
        (["gc", "{cache}", "--older-than", "soon"], "--older-than 'soon'"),
        (["retract", "{cache}", "nope"], "is not a live segment"),
        (["stats", "{cache}", "--layers", "9"], "layer 9 is not in the cache"),
        (["info", "{cache}", "-o", "{{bad"], "not valid JSON"),
    ],
)
def test_one_line_errors(run, make_cache, tmp_path, args, needle):
    url, _ = make_cache(segments=(5,))
    code, out, err = run(*[a.format(tmp=tmp_path, cache=url) for a in args])
    assert code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.slow
def test_subprocess_error_is_one_line_and_debug_shows_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run(
        [sys.executable, "-m", "cache_format", "info", str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "is not a cache" in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "cache_format", "info", str(tmp_path), "--debug"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode != 0 and "Traceback" in p.stderr
