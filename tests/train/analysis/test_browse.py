"""The feature browser in a real browser: `python -m train browse` serving a run, and its static
export from a plain HTTP server, driven in Debian's headless Chromium. What the pages show is
compared with the parquet files `train analyze` wrote.

The run is built once per module: two SAEs on the analysis test cache (an exact ±basis SAE and
a copy of it, so the best match of feature j in the other SAE is feature j at cosine 1).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import urlopen

import numpy as np
import pyarrow.parquet as pq
import pytest
from analysis_data import FRACTION, LAYER, SEED, exported_run
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from harvest.splice import write_logit_effects
from train.analysis.browse_data import RunIndex
from train.analysis.features import analyze, write_neighbours
from train.analysis.scan import RowSelection
from train.config import AnalysisConfig
from train.outdir import write_run_json
from train.published import load_sae

A, B = "L2_n32_k16", "L2_n32_k16_copy"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out, url, sae = exported_run(
        tmp_path_factory.mktemp("browse"), name=A, trajectory=[], metrics={"variance_explained": 1.0}
    )
    shutil.copytree(out / A, out / B)
    write_run_json(out, {"saes": [{"name": n, "path": n, "layer": LAYER} for n in (A, B)]})
    cfg = AnalysisConfig(top_examples=4, context_tokens=4, bootstrap=20, permutations=500)
    for name in (A, B):
        analyze(load_sae(out / name), url, LAYER, out / name, cfg, RowSelection(SEED, FRACTION, (2, 3)), progress=False)
    write_neighbours({n: (load_sae(out / n), out / n) for n in (A, B)}, device="cpu")
    # logit effects for B only (harvest computes them with the model; here, made-up tokens)
    ids = np.arange(64 * 3, dtype=np.int32).reshape(64, 3)[:32] % 50
    write_logit_effects(
        out / B / "logit_effects.parquet",
        {
            "feature": np.arange(32, dtype=np.int32),
            "top_token_ids": ids,
            "top_tokens": [[f"up{i}" for i in row] for row in ids],
            "top_values": np.linspace(3, 1, 96, dtype=np.float32).reshape(32, 3),
            "bottom_token_ids": ids,
            "bottom_tokens": [[f"down{i}" for i in row] for row in ids],
            "bottom_values": -np.ones((32, 3), np.float32),
            "hist_low": np.full(32, -1.0),
            "hist_high": np.full(32, 3.0),
            "hist_counts": np.ones((32, 4), np.int32),
        },
    )
    return out


def parquet(run, name, file):
    return pq.read_table(run / name / file).to_pandas()


def start_server(args, env=None):
    """`python -m train browse ARGS --port 0` in a subprocess; (process, base URL)."""
    p = subprocess.Popen(
        [sys.executable, "-m", "train", "browse", *map(str, args), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
    )
    line = p.stderr.readline()
    m = re.search(r"at (http://\S+/) ", line)
    assert m, line + p.stderr.read() if p.poll() is not None else line
    return p, m.group(1)


@pytest.fixture(scope="module")
def server(run):
    p, url = start_server(["--out", run])
    yield url
    p.terminate()
    p.wait(timeout=30)


class LoggingHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.paths.append(self.path.split("?")[0])
        super().do_GET()


@pytest.fixture(scope="module")
def static_site(run, tmp_path_factory):
    """The export, served by Python's plain static file server (no Range, no server code)."""
    site = tmp_path_factory.mktemp("site") / "site"
    r = subprocess.run(
        [sys.executable, "-m", "train", "browse", "--out", run, "--export", site, "--quiet"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert r.returncode == 0, r.stderr
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(LoggingHandler, directory=str(site)))
    httpd.paths = []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", httpd.paths, site
    httpd.shutdown()


# -- helpers --------------------------------------------------------------------------------


def wait(driver, js, timeout=30):
    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(js))


def table_rows(driver):
    return driver.execute_script("return window.BROWSE.table.getData()")


def counter(driver):
    return driver.find_element(By.CSS_SELECTOR, ".tabulator-page-counter").text


def rows_match(driver, n_rows):
    text = "document.querySelector('.tabulator-page-counter').textContent"
    return wait(driver, f"return {text}.includes('of {n_rows} rows')")


def visible(s):
    return s.replace("\r", "").replace("\n", "↵").replace("\t", "→")


def exercise_index(driver, url, run):
    """Load the index, sort, filter, search a token; compare with the parquet files."""
    ma, mb = parquet(run, A, "feature_metrics.parquet"), parquet(run, B, "feature_metrics.parquet")
    driver.get(url)
    wait(driver, "return window.BROWSE.table && window.BROWSE.table.getData().length > 0")
    rows = table_rows(driver)
    assert [r["sae"] for r in rows[:32]] == [A] * 32 and rows[32]["sae"] == B  # both SAEs, run order
    assert [r["feature"] for r in rows[:3]] == [0, 1, 2]
    assert rows[1]["fire_rate"] == pytest.approx(ma.loc[1, "fire_rate"], rel=1e-3)
    assert "of 64 rows" in counter(driver)
    # the first rendered row shows feature 0 of A
    cell = driver.find_element(By.CSS_SELECTOR, ".tabulator-row .tabulator-cell[tabulator-field='feature']")
    assert cell.text == "0"

    # sort: max activation, descending (two clicks on the header)
    header = driver.find_element(By.CSS_SELECTOR, ".tabulator-col[tabulator-field='max_activation']")
    header.click()
    wait(driver, "return window.BROWSE.table.getData()[0].max_activation !== null")
    header.click()
    best = max(ma["max_activation"].max(), mb["max_activation"].max())
    wait(driver, f"return Math.abs(window.BROWSE.table.getData()[0].max_activation - {best}) < 1e-3 * {best}")
    got = [r["max_activation"] for r in table_rows(driver) if r["max_activation"] is not None]
    assert got == sorted(got, reverse=True)
    assert "sort=max_activation" in driver.current_url and "dir=desc" in driver.current_url

    # filter: one SAE, and significant only
    Select(driver.find_element(By.NAME, "sae")).select_by_value(B)
    rows_match(driver, 32)
    assert {r["sae"] for r in table_rows(driver)} == {B}
    driver.find_element(By.NAME, "significant").click()
    n_sig = int((mb["q_value"] <= 0.05).sum())
    assert 0 < n_sig < 32
    rows_match(driver, n_sig)
    assert {r["feature"] for r in table_rows(driver)} == set(mb.index[mb["q_value"] <= 0.05])
    driver.find_element(By.CSS_SELECTOR, "button[type=reset]").click()
    rows_match(driver, 64)

    # search a token: exactly the features whose top contexts fire on it
    prompts = parquet(run, A, "feature_prompts.parquet")
    token = prompts.loc[prompts["feature"] == 9, "token"].iloc[0]
    want = set(prompts.loc[prompts["token"] == token, "feature"])
    box = driver.find_element(By.NAME, "q")
    box.send_keys(f'"{token}"')
    rows_match(driver, 2 * len(want))
    got = {(r["sae"], r["feature"]) for r in table_rows(driver)}
    assert got == {(s, f) for s in (A, B) for f in want}
    assert "q=" in driver.current_url
    return token


def exercise_feature(driver, run, back_query):
    """The feature page shows the parquet's top context, token by token, with its values."""
    wait(driver, "return document.body.dataset.features === '1'")
    el = driver.find_element(By.ID, "feature")
    sae, fid = el.get_attribute("data-sae"), int(el.get_attribute("data-feature"))
    prompts = parquet(run, sae, "feature_prompts.parquet")
    ex = prompts[prompts["feature"] == fid].sort_values("rank")
    assert len(driver.find_elements(By.CSS_SELECTOR, ".example")) == len(ex)
    for r in ex.to_dict("records"):
        spans = driver.find_elements(By.CSS_SELECTOR, f".example[data-rank='{r['rank']}'] .tok")
        assert [s.text for s in spans] == [visible(t) for t in r["context_tokens"]]
        for s, v in zip(spans, r["context_activations"]):
            shown = s.get_attribute("data-value")
            if np.isnan(v):
                assert shown == "" and "na" in s.get_attribute("class")
            else:
                assert float(shown) == pytest.approx(v, rel=1e-3, abs=1e-6)
                assert s.get_attribute("title") == f"activation {shown}"
                assert ("background" in (s.get_attribute("style") or "")) == (v > 0)
        assert "focus" in spans[r["context_focus"]].get_attribute("class")
    labels = set(ex["label"])
    sections = {e.get_attribute("class") for e in driver.find_elements(By.CSS_SELECTOR, "section.examples")}
    if {0, 1} <= labels:
        assert {"examples correct", "examples wrong"} <= sections
    m = parquet(run, sae, "feature_metrics.parquet").loc[fid]
    stats = driver.find_element(By.CSS_SELECTOR, "table.stats").text
    assert f"{int(m['fire_count'])} rows" in stats
    assert driver.find_element(By.CSS_SELECTOR, "figure.hist svg")
    other = driver.find_elements(By.CSS_SELECTOR, "figure.other td a")
    assert other and other[0].text == f"{B if sae == A else A} #{fid}"  # the copy's same feature, cosine 1
    if sae == B:
        le = parquet(run, B, "logit_effects.parquet").loc[fid]
        shown = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "figure.promoted td code")]
        assert shown == list(le["top_tokens"])
    else:
        assert "harvest logit-effects" in driver.find_element(By.CSS_SELECTOR, ".missing-logits").text
    back = driver.find_element(By.CSS_SELECTOR, "a.back").get_attribute("href")
    assert back_query in back  # the index's filters are kept
    return sae, fid


# -- tests ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_server_index_and_feature_pages(chromium, server, run):
    token = exercise_index(chromium, server, run)
    first = table_rows(chromium)[0]
    chromium.find_element(By.CSS_SELECTOR, ".tabulator-row").click()
    wait(chromium, "return location.pathname.startsWith('/feature/')")
    sae, fid = exercise_feature(chromium, run, "q=")
    assert (sae, fid) == (first["sae"], first["feature"])
    assert chromium.current_url.split("?")[0] == f"{server}feature/{sae}/{fid}"
    assert token  # searched above
    # next feature by keyboard; the permalink is the bare URL
    chromium.find_element(By.TAG_NAME, "body").send_keys("j")
    wait(chromium, f"return location.pathname === '/feature/{sae}/{fid + 1}'")
    wait(chromium, f"return document.querySelector('#feature').dataset.feature === '{fid + 1}'")
    assert chromium.find_element(By.CSS_SELECTOR, "a.permalink").get_attribute("href") == (
        f"{server}feature/{sae}/{fid + 1}"
    )
    # compare
    chromium.get(f"{server}compare/{A}/9/{B}/9")
    wait(chromium, "return document.body.dataset.features === '2'")
    assert chromium.find_element(By.CSS_SELECTOR, "#left .fid").text == "9"
    assert chromium.find_element(By.CSS_SELECTOR, "#right .sae").text == B
    promoted = chromium.find_elements(By.CSS_SELECTOR, "#right figure.promoted td code")
    assert [c.text for c in promoted] == list(parquet(run, B, "logit_effects.parquet").loc[9, "top_tokens"])
    assert chromium.find_elements(By.CSS_SELECTOR, "#left .missing-logits")


@pytest.mark.slow
def test_static_export_from_a_plain_http_server(chromium, static_site, run):
    url, paths, site = static_site
    paths.clear()
    chromium.get(url + "index.html")
    wait(chromium, "return window.BROWSE.table && window.BROWSE.table.getData().length > 0")
    # the first page comes from meta.json and one block of snippets: no columns, no features
    assert "/data/meta.json" in paths
    assert not [p for p in paths if p.startswith(("/data/features/", "/data/columns/"))], paths
    exercise_index(chromium, url + "index.html", run)
    chromium.find_element(By.CSS_SELECTOR, ".tabulator-row").click()
    wait(chromium, "return location.pathname.endsWith('/feature.html')")
    exercise_feature(chromium, run, "q=")
    assert len(list((site / "data" / "features").rglob("*.json.gz"))) == 2  # one block of 64 per SAE


def test_api_matches_the_index_and_404s(server, run):
    meta = json.load(urlopen(server + "api/meta"))
    assert [s["name"] for s in meta["saes"]] == [A, B] and meta["n"] == 64
    page = json.load(urlopen(server + "api/features?sort=auroc&dir=desc&size=5&sae=" + A))
    ma = parquet(run, A, "feature_metrics.parquet")
    assert page["last_row"] == 32 and page["data"][0]["auroc"] == pytest.approx(ma["auroc"].max(), rel=1e-3)
    for path in (f"feature/{A}/32", "feature/nope/1", f"compare/{A}/0/nope/1", "nowhere"):
        with pytest.raises(HTTPError) as e:
            urlopen(server + path)
        assert e.value.code == 404
        body = e.value.read().decode()
        assert 'href="/"' in body and "index" in body, path
    with pytest.raises(HTTPError) as e:
        urlopen(server + f"api/feature/{A}/99")
    assert e.value.code == 404 and "features 0 to 31" in json.loads(e.value.read())["error"]
    with pytest.raises(HTTPError) as e:
        urlopen(server + "api/features?sort=nope")
    assert e.value.code == 400


def test_remote_run_over_http_reads_the_same(run, http_serve):
    local, remote = RunIndex(str(run)), RunIndex(http_serve(run))
    q = {"sort": "max_activation", "dir": "desc", "size": 10}
    assert remote.page(q) == local.page(q)
    assert remote.feature(B, 9) == local.feature(B, 9)


def _one_line(args, env=None):
    r = subprocess.run(
        [sys.executable, "-m", "train", "browse", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_bad_input_is_one_line(run, tmp_path, server):
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("*.parquet"))
    assert "make report" in _one_line(["--out", bare])
    port = int(server.rsplit(":", 1)[1].strip("/"))
    assert f"port {port}" in _one_line(["--out", run, "--port", port])
    line = _one_line(["--out", "http://127.0.0.1:9/run"], env={"ACTCACHE_RETRIES": "0"})
    assert "http://127.0.0.1:9/run" in line and "reachable" in line


def test_dashboard_export_is_sae_dashboard_batches(run, tmp_path):
    from train.analysis.browse import export_dashboard

    out = export_dashboard(RunIndex(str(run)), tmp_path / "dash", progress=False)
    ma = parquet(run, A, "feature_metrics.parquet")
    batch = json.loads((out / A / "batch-0.json").read_text())
    assert set(batch) == {"model_id", "layer", "sae_set", "sae_id_suffix", "features"}
    feats = {f["feature_index"]: f for f in batch["features"]}
    assert set(feats) == set(ma.index[ma["fire_count"] > 0])  # alive ones; the dead are skipped
    skipped = json.loads((out / A / "skipped_indexes.json").read_text())["skipped_indexes"]
    assert set(skipped) == set(ma.index[ma["fire_count"] == 0])
    f = feats[9]
    keys = {  # NeuronpediaDashboardFeature.to_dict() in sae-dashboard 0.8.0
        "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
        "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
        "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
        "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values",
        "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
        "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations", "vector",
    }  # fmt: skip
    assert set(f) == keys
    assert f["frac_nonzero"] == pytest.approx(ma.loc[9, "fire_rate"])
    prompts = parquet(run, A, "feature_prompts.parquet")
    top = prompts[prompts["feature"] == 9].sort_values("rank").iloc[0]
    act = f["activations"][0]
    assert act["tokens"] == list(top["context_tokens"]) and act["qualifying_token_index"] == top["context_focus"]
    assert act["values"][top["context_focus"]] == pytest.approx(top["activation"], rel=1e-3)
    assert set(act) == {"bin_min", "bin_max", "bin_contains", "tokens", "values", "qualifying_token_index"}
