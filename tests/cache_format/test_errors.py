"""`run_cli`: a failure a user can cause is one line; an OSError's advice follows its errno."""

import errno
import os
import sys

import click
import pytest

from cache_format.errors import run_cli


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
