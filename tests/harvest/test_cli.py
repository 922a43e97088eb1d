"""The harvest CLI: one-line errors for what a user can get wrong, and a real run."""

import json
import subprocess
import sys

import pytest

import cache_format as cf
from harvest.cli import main

TINY = ["--profile", "tiny", "--quiet"]


def run_main(monkeypatch, capsys, args):
    monkeypatch.setattr(sys, "argv", ["harvest", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line(code, err, *words):
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_layer_past_the_models_depth(monkeypatch, capsys, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, ["run", *TINY, "--cache", str(tmp_path / "c"), "--layers", "1,99"])
    assert_one_line(code, err, "layer 99", "depth", "--layers")
    assert not (tmp_path / "c").exists()  # refused before anything was created


def test_unknown_source(monkeypatch, capsys, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, ["run", *TINY, "--cache", str(tmp_path / "c"), "--source", "wiki"])
    assert_one_line(code, err, "unknown source 'wiki'", "--source")


@pytest.mark.parametrize(
    "text, words",
    [
        ("[harvest\nlayers = [1]\n", ["malformed TOML"]),
        ("[harvest]\nlayerz = [1]\n", ["unknown key 'layerz'"]),
        ('[harvest]\nbatch_size = "two"\n', ["expected an integer"]),
    ],
)
def test_bad_pipeline_toml(monkeypatch, capsys, tmp_path, text, words):
    p = tmp_path / "pipeline.toml"
    p.write_text(text)
    code, _, err = run_main(monkeypatch, capsys, ["run", "--config", str(p), "--cache", str(tmp_path / "c")])
    assert_one_line(code, err, *words)


def test_dataset_file_with_missing_fields(monkeypatch, capsys, tmp_path):
    ds = tmp_path / "q.jsonl"
    ds.write_text(json.dumps({"uuid": "1", "question": "?", "options": ["a", "b"]}) + "\n")
    code, _, err = run_main(
        monkeypatch, capsys, ["run", *TINY, "--cache", str(tmp_path / "c"), "--set", f'supergpqa.dataset="{ds}"']
    )
    assert_one_line(code, err, "answer_letter", "SuperGPQA schema")


def test_dataset_file_that_does_not_exist(monkeypatch, capsys, tmp_path):
    code, _, err = run_main(
        monkeypatch,
        capsys,
        ["run", *TINY, "--cache", str(tmp_path / "c"), "--set", f'supergpqa.dataset="{tmp_path}/none.jsonl"'],
    )
    assert_one_line(code, err, "does not exist")


def test_model_path_that_does_not_exist(monkeypatch, capsys, tmp_path):
    code, _, err = run_main(
        monkeypatch,
        capsys,
        ["run", *TINY, "--cache", str(tmp_path / "c"), "--set", f'model.name_or_path="{tmp_path}/no-model"'],
    )
    assert_one_line(code, err, "does not exist", "model.name_or_path")


def test_appending_with_another_source_is_refused(monkeypatch, capsys, tmp_path):
    url = str(tmp_path / "c")
    args = ["run", *TINY, "--cache", url, "--layers", "1", "--set", "corpus.seq_len=64"]
    code, out, err = run_main(monkeypatch, capsys, [*args, "--source", "corpus", "--tokens", "256", "--json"])
    assert code == 0 and json.loads(out)["n_tokens"] == 256
    code, _, err = run_main(monkeypatch, capsys, [*args, "--source", "supergpqa", "--questions", "2"])
    assert_one_line(code, err, "another --cache")
    assert cf.open_cache(url).n_tokens == 256  # nothing committed was touched


@pytest.mark.slow
def test_make_style_subprocess_run_prints_json_and_progress(tmp_path):
    url = str(tmp_path / "c")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "harvest",
            "run",
            "--profile",
            "tiny",
            "--cache",
            url,
            "--layers",
            "1,3,5",
            "--questions",
            "4",
            "--set",
            "supergpqa.max_new_tokens=8",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)  # stdout holds only the JSON
    assert summary["layers"] == [1, 3, 5] and summary["n_tokens"] == cf.open_cache(url).n_tokens
    assert "tok/s" in p.stderr and "MB/s" in p.stderr
