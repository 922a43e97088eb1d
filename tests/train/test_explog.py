"""`train.log`: each SAE's trajectory in TensorBoard event files or an offline wandb run."""

import glob
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from planted_data import write_planted

from cache_format.errors import UserError
from train.cli import cli
from train.explog import check_kind, open_log

ROOT = Path(__file__).resolve().parents[2]
RUN = [
    "--profile",
    "tiny",
    "--set",
    "train.d_sae=384",
    "--set",
    "train.k=3",
    "--set",
    "train.k_aux=8",
    "--set",
    "train.batch_size=256",
    "--set",
    "train.lr=0.004",
    "--set",
    "train.dead_tokens=1024",
    "--set",
    "train.shuffle_buffer_tokens=4096",
    "--set",
    "train.geometric_median_samples=512",
    "--set",
    "train.eval_tokens=1024",
    "--set",
    "train.training_tokens=5120",
    "--set",
    "train.eval_every_tokens=2560",
    "--set",
    "train.checkpoint_every_tokens=5120",
]


def scalars(event_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_run_logs_every_sae_trajectory(tmp_path):
    url = str(tmp_path / "cache")
    write_planted(url, layers=(2, 4), n=8192)
    out = tmp_path / "out"
    r = CliRunner().invoke(
        cli, ["run", "--no-progress", *RUN, "--cache", url, "--out", str(out), "--set", 'train.log="tensorboard"']
    )
    assert r.exit_code == 0, r.output + repr(r.exception)
    for name in ("L2_n384_k3", "L4_n384_k3"):
        got = scalars(out / "logs" / name)
        for tag in ("train/loss", "train/fvu", "train/aux_loss", "train/dead", "train/lr"):
            assert [s for s, _ in got[tag]] == list(range(256, 5121, 256)), tag  # x axis: tokens, every step
        ve = got["heldout/variance_explained"]
        assert [s for s, _ in ve] == [2560, 5120] and all(0 < v <= 1 for _, v in ve)
        assert {"heldout/mse", "heldout/l0", "heldout/dead_fraction", "heldout/alive"} <= set(got)
        assert max(v for _, v in got["train/dead"]) > 0 and max(v for _, v in got["train/aux_loss"]) > 0


def test_wandb_offline_run_holds_the_trajectory(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = open_log("wandb", tmp_path / "logs", "planted", {"train": {"d_sae": 96}})
    for step in range(1, 4):
        log.train_step(
            "L2_n96_k3", 256 * step, {"loss": 1.0 / step, "fvu": 0.5 / step, "aux_loss": 0.1, "dead": 3, "lr": 1e-3}
        )
    log.heldout("L2_n96_k3", 768, {"variance_explained": 0.91, "l0": 3.0})
    import wandb

    summary = dict(wandb.run.summary)  # wandb's own public handle on the active run
    log.close()
    assert summary["L2_n96_k3/train/loss"] == pytest.approx(1 / 3) and summary["L2_n96_k3/tokens"] == 768
    assert summary["L2_n96_k3/heldout/variance_explained"] == pytest.approx(0.91)
    files = glob.glob(str(tmp_path / "logs" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1  # an offline run for `wandb sync`, nothing sent
    # wandb's service process may still be flushing the offline file after finish() on a busy box
    want = (b"L2_n96_k3/heldout/variance_explained", b"L2_n96_k3/train/aux_loss")
    deadline = time.monotonic() + 60
    while not all(w in (data := Path(files[0]).read_bytes()) for w in want) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(w in data for w in want)


def test_unknown_kind_and_missing_package_are_one_line_errors():
    with pytest.raises(UserError) as e:
        check_kind("mlflow")
    assert "none, tensorboard, wandb" in str(e.value) and "\n" not in str(e.value)
    # a Python without wandb importable (None in sys.modules is how Python blocks an import)
    code = (
        "import sys; sys.modules['wandb'] = None\n"
        "from train.explog import check_kind\n"
        "try:\n    check_kind('wandb')\nexcept Exception as e:\n    print(type(e).__name__, e)"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert p.stdout.strip() == "UserError train.log='wandb' needs the wandb package: pip install wandb"
