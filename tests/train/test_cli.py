"""`train eval / analyze / report` and `harvest loss-recovered` on real caches and exports."""

import json

import numpy as np
import pytest
import torch
from analysis_data import FRACTION, LAYER, exported_run, identity_sae
from click.testing import CliRunner

import cache_format as cf
from train.cli import analyze_cmd, eval_cmd, report_cmd
from train.export import export_sae

NAME = "L2_n32_k16"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    traj = [
        {"tokens": t, "variance_explained": 1 - 1 / (1 + t / 100), "dead_fraction": 0.5, "l0": 2.5}
        for t in (100, 200, 300)
    ]
    out, url, _ = exported_run(
        tmp_path_factory.mktemp("run"),
        name=NAME,
        trajectory=traj,
        metrics={"variance_explained": 1.0, "mse": 0.0, "l0": 2.5, "dead_fraction": 0.5, "alive": 16},
    )
    return out, url


def _ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_eval_json_on_export_and_on_a_000_file(run_dir):
    out, url = run_dir
    r = _ok(CliRunner().invoke(eval_cmd, ["--sae", str(out / NAME), "--json", "--quiet"]))
    m = json.loads(r.stdout)
    assert m["variance_explained"] == pytest.approx(1.0, abs=1e-6)
    assert m["mse"] == pytest.approx(0.0, abs=1e-9)
    assert m["same_data_as_training"] is True and m["layer"] == LAYER and m["layout"] == "sae_lens"
    assert set(m) >= {"variance_explained", "mse", "l0", "dead_fraction", "alive"}
    # the 000 .pt beside it records neither cache nor split: pass them; same metrics
    r = _ok(
        CliRunner().invoke(
            eval_cmd,
            [
                "--sae",
                str(out / NAME / f"sae_L{LAYER}_n32_k16.pt"),
                "--cache",
                url,
                "--set",
                f"train.heldout_fraction={FRACTION}",
                "--json",
                "--quiet",
            ],
        )
    )
    m2 = json.loads(r.stdout)
    assert m2["layout"] == "topk_pt" and m2["l0"] == pytest.approx(m["l0"]) and m2["alive"] == m["alive"]


def test_eval_reads_gemma_scope_npz_and_dictionary_learning_ae_pt(run_dir, tmp_path):
    """The identity SAE written in both layouts: eval reconstructs the cache exactly from either."""
    sae = identity_sae()
    w = {n: getattr(sae, n).detach() for n in ("W_enc", "W_dec", "b_enc", "b_dec")}
    gs = tmp_path / f"layer_{LAYER}" / "width_1k"
    gs.mkdir(parents=True)
    np.savez(
        gs / "params.npz", threshold=np.zeros(w["b_enc"].shape, np.float32), **{n: t.numpy() for n, t in w.items()}
    )
    dl = tmp_path / "trainer_0"
    dl.mkdir()
    sd = {"W_enc": w["W_enc"], "b_enc": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    torch.save({**sd, "threshold": torch.zeros(w["b_enc"].shape)}, dl / "ae.pt")
    (dl / "config.json").write_text(json.dumps({"trainer": {"dict_class": "JumpReluAutoEncoder", "layer": LAYER}}))
    for path, layout in ((gs / "params.npz", "gemma_scope"), (dl, "dictionary_learning")):
        args = ["--sae", str(path), "--cache", run_dir[1], "--set", f"train.heldout_fraction={FRACTION}"]
        m = json.loads(_ok(CliRunner().invoke(eval_cmd, [*args, "--json", "--quiet"])).stdout)
        assert m["layout"] == layout and m["layer"] == LAYER and m["architecture"] == "jumprelu"
        assert m["variance_explained"] == pytest.approx(1.0, abs=1e-6) and m["l0"] > 0


def test_eval_bad_sae_is_one_line(run_dir, tmp_path):
    bad = tmp_path / "sae_L2_n32_k16.pt"
    bad.write_bytes(b"garbage")
    r = CliRunner().invoke(eval_cmd, ["--sae", str(bad), "--cache", run_dir[1], "--json"])
    assert r.exit_code != 0 and "not a readable PyTorch file" in str(r.exception)


def test_analyze_then_report(run_dir):
    out, _ = run_dir
    r = _ok(
        CliRunner().invoke(
            analyze_cmd,
            [
                "--out",
                str(out),
                "--json",
                "--quiet",
                "--set",
                "analysis.bootstrap=20",
                "--set",
                "analysis.permutations=50",
            ],
        )
    )
    summary = json.loads(r.stdout)[NAME]
    assert summary["max_auroc"] == pytest.approx(1.0) and summary["alive"] == 10  # features 0, 1 and 8..15
    for f in ("feature_metrics.parquet", "feature_prompts.parquet", "feature_stats.json", "analysis.json"):
        assert (out / NAME / f).is_file()
    r = _ok(CliRunner().invoke(report_cmd, ["--out", str(out)]))
    page = (out / "report.html").read_text()
    assert r.stdout.strip() == str(out / "report.html")
    assert page.count("data:image/png;base64,") >= 3  # curve + two histograms
    assert "correct↑" in page and "<mark>" in page and NAME in page
    assert "http://" not in page.replace("http://www.w3.org", "")  # self-contained
    assert "all labeled rows" in page  # the report says which rows the statistics cover


@pytest.mark.parametrize("kind", ["jumprelu", "relu"])
def test_analyze_and_report_read_every_kind(tmp_path, kind):
    """The identity SAE as a JumpReLU (BatchTopK's and Matryoshka's inference form too) and as a
    ReLU: the same codes as the TopK one, so the same analysis; the report names the kind."""
    from train.sae import JumpReLUSAE, ReLUSAE

    top = identity_sae()
    sae = JumpReLUSAE(top.d_in, top.d_sae, init_threshold=0.0) if kind == "jumprelu" else ReLUSAE(top.d_in, top.d_sae)
    with torch.no_grad():
        for n in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(sae, n).copy_(getattr(top, n))
    traj = [{"tokens": 100, "variance_explained": 0.5, "dead_fraction": 0.5, "l0": 2.5}]
    metrics = {"variance_explained": 1.0, "mse": 0.0, "l0": 2.5, "dead_fraction": 0.5, "alive": 16}
    out, _, _ = exported_run(tmp_path, name="L2_n32", trajectory=traj, metrics=metrics, sae=sae)
    sets = ["--set", "analysis.bootstrap=20", "--set", "analysis.permutations=50"]
    r = _ok(CliRunner().invoke(analyze_cmd, ["--out", str(out), "--json", "--quiet", *sets]))
    summary = json.loads(r.stdout)["L2_n32"]
    assert summary["max_auroc"] == pytest.approx(1.0) and summary["alive"] == 10
    _ok(CliRunner().invoke(report_cmd, ["--out", str(out)]))
    assert kind in (out / "report.html").read_text()


def test_analyze_rows_default_to_every_labeled_row_on_rollouts(run_dir, tmp_path):
    import numpy as np

    import cache_format as cf

    out, url = run_dir
    counts = {}
    for rows in ("auto", "heldout", "train", "all"):
        r = _ok(
            CliRunner().invoke(
                analyze_cmd,
                [
                    "--sae",
                    str(out / NAME),
                    "--out",
                    str(tmp_path / rows),
                    "--rows",
                    rows,
                    "--json",
                    "--quiet",
                    "--set",
                    "analysis.bootstrap=0",
                    "--set",
                    "analysis.permutations=0",
                ],
            )
        )
        counts[rows] = json.loads(r.stdout)[NAME]["tokens"]
        a = json.loads((tmp_path / rows / "analysis.json").read_text())
        assert a["split"]["rows"] == ("all" if rows == "auto" else rows) and a["split"]["labeled"] == (rows == "auto")
    c = cf.open_cache(url)
    roles, labels = np.asarray(c.roles[:]), np.asarray(c.labels[:])
    assert counts["auto"] == int((np.isin(roles, [2, 3]) & (labels >= 0)).sum())
    assert counts["heldout"] + counts["train"] == counts["all"] and 0 < counts["heldout"] < counts["auto"]


@pytest.mark.slow
def test_loss_recovered_command_on_the_tiny_model(tmp_path):
    from tokenizers import Tokenizer

    from harvest import tiny
    from harvest.cli import loss_recovered_cmd

    d, layer = 64, 3
    tok = Tokenizer.from_file(str(tiny.assets() / "tokenizer.json"))
    lines = [ln for ln in (tiny.assets() / "corpus.txt").read_text().splitlines() if len(ln.split()) > 8][:12]
    url = str(tmp_path / "cache")
    w = cf.create_cache(
        url, d_model=d, layers=[layer], meta={"model": {"name_or_path": "builtin:tiny"}}, chunk_tokens=64, shard_mib=1
    )
    with w.segment() as seg:
        for s, line in enumerate(lines):
            ids = np.asarray(tok.encode(line).ids[:24], np.int64)  # one length: one batch per pass
            n = len(ids)
            seg.append(
                residuals={layer: torch.zeros(n, d, dtype=torch.bfloat16)},
                tokens=ids,
                seq_ids=np.full(n, s),
                positions=np.arange(n),
                labels=np.full(n, -1),
                roles=np.zeros(n, np.int8),
            )
            seg.add_sequences([{"seq_id": s, "token_ids": ids.tolist()}])
    sae = identity_sae(d)
    cfg = {"d_in": d, "d_sae": 2 * d, "k": d, "layer": layer, "cache": url, "split": {"seed": 0, "fraction": 0.5}}
    export_sae(sae, tmp_path / "sae", cfg)
    r = _ok(
        CliRunner().invoke(
            loss_recovered_cmd,
            [
                "--profile",
                "tiny",
                "--sae",
                str(tmp_path / "sae"),
                "--out",
                str(tmp_path / "sae"),
                "--sequences",
                "4",
                "--json",
                "--quiet",
            ],
        )
    )
    res = json.loads(r.stdout)["sae"]
    assert res["loss_recovered"] == pytest.approx(1.0, abs=1e-4) and res["layer"] == layer and res["sequences"] == 4
    assert json.loads((tmp_path / "sae" / "loss_recovered.json").read_text())["tokens"] == res["tokens"] > 0
    # a cache harvested from another model is refused in one line
    r = CliRunner().invoke(loss_recovered_cmd, ["--sae", str(tmp_path / "sae"), "--json", "--quiet"])
    assert r.exit_code != 0 and "was harvested from 'builtin:tiny'" in str(r.exception)


@pytest.mark.slow
def test_cli_error_is_one_line_on_stderr(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "sae_L2_n32_k16.pt"
    bad.write_bytes(b"\x00" * 64)
    p = subprocess.run(
        [sys.executable, "-m", "train", "eval", "--sae", str(bad), "--cache", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a readable PyTorch file" in lines[0]
