"""`--fresh` deletes only what the previous run in OUT wrote: a name `run_state.json` lists is
confined to OUT before anything is deleted."""

import json
import os

import pytest
from click.testing import CliRunner
from support import quick_train_args

from cache_format.errors import UserError
from train.cli import cli


def run(args):
    return CliRunner().invoke(cli, ["run", *args], catch_exceptions=True)


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
