"""run.json is read through one place, and the SAE directories it lists stay inside the run."""

import json

import pytest

from cache_format.errors import UserError
from train.outdir import read_run, run_saes, write_run_json

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
