"""The HTML report renders in headless Chromium (Debian's package, which `make install` installs)
and is not blank."""

import json
import shutil
import subprocess

import pytest
from analysis_data import FRACTION, LAYER, SEED, exported_run
from support import chromium_binary, chromium_flags

from train.analysis.features import analyze
from train.analysis.report import render_report
from train.analysis.scan import RowSelection
from train.config import AnalysisConfig


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    name = "L2_n32_k16"
    traj = [{"tokens": t, "variance_explained": 1 - 1 / (1 + t / 100), "dead_fraction": 0.5} for t in (100, 200, 400)]
    out, url, sae = exported_run(
        tmp_path_factory.mktemp("rep"),
        name=name,
        hook_module="model.language_model.layers.2",
        config={"d_sae": 32, "k": 16},
        trajectory=traj,
        metrics={"variance_explained": 1.0, "mse": 0.0, "l0": 2.5, "dead_fraction": 0.69, "alive": 10},
    )
    (out / name / "loss_recovered.json").write_text(
        json.dumps(
            {
                "ce_clean": 2.0,
                "ce_sae": 2.1,
                "ce_zero": 6.0,
                "loss_recovered": 0.975,
                "kl_sae": 0.05,
                "kl_zero": 3.1,
                "tokens": 999,
            }
        )
    )
    analyze(
        sae,
        url,
        LAYER,
        out / name,
        AnalysisConfig(bootstrap=20, permutations=50),
        RowSelection(SEED, FRACTION, (2, 3)),
        progress=False,
    )
    return render_report(out)


def test_report_is_self_contained_and_complete(report):
    page = report.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page and 'src="http' not in page and 'href="http' not in page
    for needle in (
        "Final metrics",
        "Config and provenance",
        "Training curves",
        "Loss recovered",
        "0.9750",
        "Top ",
        "correct↑",
        "<mark>",
    ):
        assert needle in page, needle


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report, tmp_path):
    from matplotlib.image import imread

    shot = tmp_path / "shot.png"
    cmd = [
        chromium_binary(),
        *chromium_flags(tmp_path / "profile"),
        "--hide-scrollbars",
        "--window-size=1280,2400",
        f"--screenshot={shot}",
        report.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.is_file(), proc.stderr[-2000:]
    img = imread(str(shot))[..., :3]
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    # Not blank: plenty of non-white pixels, and colour (the plots and the highlighted tokens).
    non_white = (img < 0.95).any(axis=-1).mean()
    assert non_white > 0.03, non_white
    colourful = (img.max(axis=-1) - img.min(axis=-1) > 0.2).mean()
    assert colourful > 0.002, colourful
    shutil.copy(shot, report.parent / "report_screenshot.png")


def test_report_cache_option_names_the_cache_the_provenance_shows(report, tmp_path):
    """`train report --cache URL`: the provenance's cache, source shares and fingerprint are that
    cache's; without it, the ones the run recorded."""
    import numpy as np
    from click.testing import CliRunner

    import cache_format as cf
    from cache_format.layout import BF16
    from train.cli import report_cmd

    url = str(tmp_path / "mixture")
    w = cf.create_cache(url, d_model=4, layers=[LAYER], chunk_tokens=8, shard_mib=1)
    n = 16
    with w.segment(meta={"rows_by_source": {"wiki": 12, "code": 4}}) as seg:
        seg.append(
            residuals={LAYER: np.zeros((n, 4), BF16)},
            tokens=np.zeros(n, np.int32),
            seq_ids=np.arange(n, dtype=np.int64),
            positions=np.zeros(n, np.int32),
            labels=np.full(n, -1, np.int8),
            roles=np.zeros(n, np.int8),
        )
    fingerprint = cf.open_cache(url).fingerprint[:16]
    assert "wiki 75.0%" not in report.read_text() and fingerprint not in report.read_text()
    page = tmp_path / "report.html"
    r = CliRunner().invoke(report_cmd, ["--out", str(report.parent), "--cache", url, "--html", str(page)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    text = page.read_text()
    assert "wiki 75.0% · code 25.0%" in text and fingerprint in text and url in text
