"""One line for every bad input: a table of user mistakes across the three CLIs and the Makefile.

Each case must exit with status 2, end stderr with one `error: …` line, print no traceback,
and leave what was committed untouched. The CLIs run in-process through `run_cli` (as
`python -m …` does); the Makefile and the full-disk cases run as a few real subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys

import numpy as np
import pytest

import cache_format as cf
from cache_format.commandline import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--profile", "tiny"]
CORPUS = [*TINY, "--source", "corpus", "--layers", "1", "--tokens", "1024", "--cache"]  # then the cache path


def _group(name):
    if name == "cache_format":
        from cache_format.cli import cli
    elif name == "harvest":
        from harvest.cli import cli
    else:
        from train.cli import cli
    return cli


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A committed cache, a foreign zarr directory, a regular file, broken dumps: the inputs cases point at."""
    from tests.conftest import write_cache

    d = tmp_path_factory.mktemp("bad")
    cache = str(d / "cache")
    write_cache(cache, segments=(20, 10))
    (d / "foreign").mkdir()
    (d / "foreign" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    (d / "notadir").write_text("a regular file")
    (d / "full").mkdir()
    (d / "full" / "notes.txt").write_text("someone's files, not a cache")
    good = d / "dump.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"acts_L3": torch.zeros(8, 16)}, str(good))
    raw = good.read_bytes()
    (d / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (d / "truncated.npy").write_bytes(np.lib.format.magic(1, 0) + b"\x10\x00{'descr'")
    np.save(d / "flat.npy", np.zeros(5, np.float32))
    np.save(d / "acts_L3.npy", np.zeros((8, 16), np.float32))
    np.save(d / "labels3.npy", np.zeros(3, np.int8))
    np.save(d / "wide_L1.npy", np.zeros((8, 5), np.float32))
    np.save(d / "labels_obj.npy", np.array([1, "yes", None] * 3, dtype=object)[:8], allow_pickle=True)
    np.savez(d / "labels.npz", labels=np.zeros(8, np.int8))
    np.save(d / "labels_two.npy", np.array([0, 1, 2, 1, 0, 1, 0, 1], np.int8))
    damaged = str(d / "damaged")
    write_cache(damaged, segments=(5,))
    rec = os.path.join(damaged, "commits", "0000000001.json")
    body = open(rec, "rb").read()
    open(rec, "wb").write(body[:25] + b"\xff" + body[26:])
    # corpus and question files a user may well have, each bad at its third record
    doc = "a document of the corpus with enough words to fill a sequence or two of tokens. " * 4
    lines = {
        "c_notobj.jsonl": [json.dumps({"text": doc}), json.dumps({"text": doc}), "5"],
        "c_null.jsonl": [json.dumps({"text": doc}), json.dumps({"text": doc}), json.dumps({"text": None})],
        "q_notobj.jsonl": ["[1, 2]"],
    }
    good_q = {"uuid": "q1", "question": "2 + 2?", "options": ["3", "4", "5"], "answer_letter": "B"}
    lines["q_null_opts.jsonl"] = [json.dumps(good_q), json.dumps(good_q), json.dumps({**good_q, "options": None})]
    lines["q_str_opts.jsonl"] = [json.dumps(good_q), json.dumps(good_q), json.dumps({**good_q, "options": "ABCD"})]
    for name, ls in lines.items():
        (d / name).write_text("\n".join(ls) + "\n")
    (d / "c_latin1.txt").write_bytes(f"{doc}\n\n{doc}\n\nun caf\xe9 cr\xe8me\n".encode("latin-1"))
    (d / "small.txt").write_text("a short document.\n")  # at most 4 tokens a byte: fewer than --tokens 1024
    sources = {f"src_{n.split('.')[0]}": f'corpus.sources=[{{name="s", path="{d / n}"}}]' for n in lines}
    sources.update({f"ds_{n.split('.')[0]}": f'supergpqa.dataset="{d / n}"' for n in lines})
    sources["src_c_latin1"] = f'corpus.sources=[{{name="s", path="{d / "c_latin1.txt"}"}}]'
    sources["src_small"] = f'corpus.sources=[{{name="s", path="{d / "small.txt"}"}}]'
    return {
        "d": str(d),
        "cache": cache,
        "damaged": damaged,
        "fp": cf.open_cache(cache).fingerprint,
        "commits": sorted(os.listdir(os.path.join(cache, "commits"))),
        **sources,
    }


# (cli, args, a phrase the error line must contain). {d}, {cache}, {damaged} are filled from `world`.
CASES = [
    # python -m cache_format
    ("cache_format", ["info", "{d}/nope"], "is not a cache"),
    ("cache_format", ["info"], "Missing argument 'URL'"),
    ("cache_format", ["info", "{cache}", "--no-such-flag"], "No such option '--no-such-flag'"),
    ("train", ["run", "--no-such-flag"], "No such option '--no-such-flag'"),
    ("harvest", ["run", "--tokens", "many"], "'many' is not a valid integer"),
    ("cache_format", ["info", "{d}/foreign"], "not an actcache cache"),
    ("cache_format", ["info", "{damaged}"], "commit log is damaged"),
    ("cache_format", ["verify", "{damaged}"], "not valid UTF-8 JSON"),
    ("cache_format", ["verify", "http://127.0.0.1:9/c"], "failed after"),
    ("cache_format", ["info", "{cache}", "-o", "{{not json"], "not valid JSON"),
    ("cache_format", ["info", "{cache}", "-o", "[1]"], "must be a JSON object"),
    ("cache_format", ["gc", "{cache}", "--older-than", "soon"], "--older-than 'soon'"),
    ("cache_format", ["gc", "{cache}", "--older-than", "10m"], "add --force"),
    ("cache_format", ["gc", "{d}/nope", "--older-than", "2h"], "is not a cache"),
    ("cache_format", ["stats", "{cache}", "--layers", "99"], "layer 99 is not in the cache"),
    ("cache_format", ["stats", "{cache}", "--layers", "one"], "--layers 'one'"),
    ("cache_format", ["stats", "{cache}", "--layers", "-1"], "non-negative"),
    ("cache_format", ["retract", "{cache}", "20990101T000000-000000000000"], "not a live segment"),
    ("cache_format", ["sync", "{cache}", "http://127.0.0.1:9/c"], "read-only"),
    ("cache_format", ["sync", "{cache}", "{d}/notadir/copy"], "not a directory"),
    ("cache_format", ["sync", "{d}/nope", "{d}/copy2"], "is not a cache"),
    ("cache_format", ["publish", "{d}/nope"], "is not a cache"),
    ("cache_format", ["upgrade", "{d}/foreign"], "not an actcache cache"),
    ("cache_format", ["import", "{d}/truncated.safetensors", "--to", "{d}/imp1"], "is it truncated"),
    ("cache_format", ["import", "{d}/truncated.npy", "--to", "{d}/imp2"], "is it truncated"),
    ("cache_format", ["import", "{d}/notes.txt", "--to", "{d}/imp3"], "expected a .safetensors or .npy"),
    ("cache_format", ["import", "{d}/flat.npy", "--to", "{d}/imp4"], "expected (tokens, d_model)"),
    ("cache_format", ["import", "{d}/acts_L3.npy", "--to", "{d}/imp5", "--map", "acts_L3=x"], "expected KEY=LAYER"),
    ("cache_format", ["import", "{d}/acts_L3.npy", "--to", "{d}/imp6", "--labels", "{d}/labels3.npy"], "has 3 values"),
    ("cache_format", ["import", "{d}/acts_L3.npy", "--to", "{d}/imp7", "--codec", "lzma"], "unknown codec"),
    ("cache_format", ["import", "{d}/acts_L3.npy", "--to", "{d}/full"], "non-empty directory that is not a cache"),
    ("cache_format", ["import", "{d}/wide_L1.npy", "--to", "{cache}"], "residuals must cover exactly layers"),
    # python -m harvest run
    ("harvest", ["run", *TINY, "--cache", "{d}/h1", "--questions", "-3"], "supergpqa.questions = -3"),
    ("harvest", ["run", *TINY, "--cache", "{d}/h2", "--source", "corpus", "--tokens", "-5"], "corpus.tokens = -5"),
    ("harvest", ["run", *TINY, "--cache", "{d}/h3", "--set", "harvest.batch_size=0"], "harvest.batch_size = 0"),
    ("harvest", ["run", *TINY, "--cache", "{d}/h4", "--set", "harvest.segment_sequences=0"], "segment_sequences"),
    ("harvest", ["run", *TINY, "--cache", "{d}/h5", "--layers", "1,x"], "--layers '1,x'"),
    ("harvest", ["run", *TINY, "--cache", "{d}/h6", "--source", "wiki"], "wiki"),
    ("harvest", ["run", "--profile", "nope", "--cache", "{d}/h7"], "unknown profile 'nope'"),
    ("harvest", ["run", "--config", "{d}/missing.toml"], "does not exist"),
    ("harvest", ["run", *TINY, "--set", "harvest.colour=1"], "unknown key 'colour'"),
    ("harvest", ["run", *TINY, "--set", "nosection=1"], "must name its section"),
    ("harvest", ["run", *TINY, "--set", "harvest.batch_size"], "expected section.key=VALUE"),
    ("harvest", ["run", *TINY, "--set", "harvest.batch_size=two"], "is not a TOML literal"),
    ("harvest", ["run", *TINY, "--set", 'harvest.hook="mlp_out"', "--cache", "{d}/h8"], "resid_post"),
    ("harvest", ["run", *TINY, "--layers", "99", "--cache", "{d}/h9"], "past the model's depth"),
    ("harvest", ["run", *TINY, "--cache", "{d}/full"], "non-empty directory that is not a cache"),
    ("harvest", ["run", *TINY, "--cache", "{d}/notadir/c"], "not a directory"),
    ("harvest", ["run", *TINY, "--cache", "{d}/foreign"], "not an actcache cache"),
    ("harvest", ["run", *TINY, "--cache", "{d}/h10", "--set", "harvest.batch_size=-1"], "came from --set: give --set"),
    ("harvest", ["run", *TINY, "--set", "harvest.batch_size=true"], "--set harvest.batch_size: expected an integer"),
    # corpus and question files: one line naming the file and line (or record)
    ("harvest", ["run", *CORPUS, "{d}/c1", "--set", "{src_c_notobj}"], "c_notobj.jsonl:3: a JSON number where an"),
    ("harvest", ["run", *CORPUS, "{d}/c2", "--set", "{src_c_latin1}"], "c_latin1.txt:5: byte 0xe9 at column 7 is not"),
    ("harvest", ["run", *CORPUS, "{d}/c3", "--set", "{src_c_null}"], "c_null.jsonl:3: 'text' is null, not text"),
    ("harvest", ["run", *TINY, "--cache", "{d}/q1", "--set", "{ds_q_notobj}"], "q_notobj.jsonl:1: a JSON array"),
    ("harvest", ["run", *TINY, "--cache", "{d}/q2", "--set", "{ds_q_null_opts}"], "q_null_opts.jsonl:3: options is"),
    ("harvest", ["run", *TINY, "--cache", "{d}/q3", "--set", "{ds_q_str_opts}"], "jsonl:3: options is a string"),
    # --tokens beyond what the sources can give: refused before any planning (no cache is made)
    ("harvest", ["run", *CORPUS, "{d}/c4", "--set", "{src_small}"], "more than the corpus sources can give"),
    ("harvest", ["run", *CORPUS, "{d}/c5", "--tokens", str(10**20)], "the rows a cache indexes"),
    ("cache_format", ["import", "{d}/acts_L3.npy", "--to", "{d}/imp8", "--labels", "{d}/labels_obj.npy"], "Object arr"),
    ("cache_format", ["import", "{d}/acts_L3.npy", "--to", "{d}/imp9", "--labels", "{d}/labels.npz"], ".npz archive"),
    ("cache_format", ["import", "{d}/acts_L3.npy", "--to", "{d}/imp10", "--labels", "{d}/labels_two.npy"], "hold 2;"),
    # python -m train run
    (
        "train",
        ["run", *TINY, "--cache", "{cache}", "--out", "{d}/t1", "--set", "train.training_tokens=-5"],
        "train.training_tokens = -5",
    ),
    ("train", ["run", *TINY, "--cache", "{cache}", "--out", "{d}/t2", "--set", "train.lr=-1"], "train.lr = -1"),
    (
        "train",
        ["run", *TINY, "--cache", "{cache}", "--out", "{d}/t3", "--set", "train.heldout_fraction=1.5"],
        "must be below 1",
    ),
    ("train", ["run", *TINY, "--cache", "{cache}", "--out", "{d}/t4", "--set", "train.k=0"], "train.k = 0"),
    (
        "train",
        ["run", *TINY, "--cache", "{cache}", "--out", "{d}/t5", "--set", "train.batch_size=0"],
        "train.batch_size = 0",
    ),
    ("train", ["run", *TINY, "--cache", "{d}/nope", "--out", "{d}/t6"], "is not a cache"),
    ("train", ["run", *TINY, "--cache", "{damaged}", "--out", "{d}/t7"], "commit log is damaged"),
    ("train", ["run", *TINY, "--cache", "{cache}", "--out", "{d}/t8", "--layers", "2"], "[2] not in the cache"),
    ("train", ["run", *TINY, "--cache", "{cache}", "--out", "{d}/t9", "--set", "train.d_sae=-4"], "train.d_sae = -4"),
    (
        "train",
        ["run", *TINY, "--cache", "{cache}", "--out", "{d}/t10", "--set", "train.sweep=[{{matryoshka_sizes=[8]}]"],
        "train.sweep[0]: matryoshka_sizes is not read by architecture 'topk'",
    ),
    ("train", ["browse", "--out", "{d}/nope"], "no run.json here"),
    ("train", ["browse", "--out", "{cache}"], "no run.json here"),
    ("harvest", ["logit-effects", *TINY, "--sae", "{d}/nope.pt"], "no such SAE file or directory"),
]


def _fill(args, world):
    return [a.format(**world) if "{" in a and "{{" not in a else a.replace("{{", "{") for a in args]


@pytest.mark.parametrize("prog, args, phrase", CASES, ids=[f"{i:02d}-{c[0]}-{c[2][:24]}" for i, c in enumerate(CASES)])
def test_a_bad_input_is_one_line_and_exit_2(world, prog, args, phrase, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"python -m {prog}", *_fill(args, world)])
    with pytest.raises(SystemExit) as e:
        run_cli(_group(prog), f"python -m {prog}")
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert e.value.code == 2, err
    assert last.startswith("error: ") and phrase in last, err
    assert "Traceback" not in err


@pytest.mark.timeout(120)  # --tokens 1e20 used to hang, walking range(n_seq) to plan
@pytest.mark.parametrize("tokens, src", [(10**20, None), (10**18, "src_small")])
def test_tokens_the_sources_cannot_give_are_refused_at_once_before_a_cache_is_made(
    world, tokens, src, monkeypatch, capsys
):
    import time

    cache = os.path.join(world["d"], f"refused-{tokens}")
    args = ["run", *TINY, "--source", "corpus", "--cache", cache, "--tokens", str(tokens)]
    monkeypatch.setattr(sys, "argv", ["python -m harvest", *args, *(["--set", world[src]] if src else [])])
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as e:
        run_cli(_group("harvest"), "python -m harvest")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: corpus.tokens = "), err
    assert time.monotonic() - t0 < 30 and not os.path.exists(cache)


def test_a_refused_write_is_one_line_and_keeps_the_source(world, monkeypatch, capsys):
    """A write the OS refuses (EACCES: root ignores chmod, so the refusal is injected at the rename)."""
    import errno

    real = os.replace

    def refuse(src, dst, *a, **kw):
        if "/refused/" in str(dst):
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", refuse)
    monkeypatch.setattr(sys, "argv", ["python -m cache_format", "sync", world["cache"], f"{world['d']}/refused"])
    with pytest.raises(SystemExit) as e:
        run_cli(_group("cache_format"), "python -m cache_format")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: cannot write"), err
    assert "Permission denied" in err[0] and "writable location" in err[0]
    assert cf.open_cache(world["cache"]).fingerprint == world["fp"]


def test_the_table_is_big_enough_and_nothing_committed_was_lost(world):
    assert len(CASES) + len(MAKE_CASES) + 3 >= 40  # + the refused write above and the two full-disk cases below
    c = cf.open_cache(world["cache"])
    assert (
        c.fingerprint == world["fp"] and sorted(os.listdir(os.path.join(world["cache"], "commits"))) == world["commits"]
    )
    assert cf.open_cache(world["cache"]).n_tokens == 30
    assert os.listdir(os.path.join(world["d"], "full")) == ["notes.txt"]  # not turned into a cache


MAKE_CASES = [
    (["harvest", "PROFILE=tiny", "LAYERS=1,x", "CACHE={d}/m1"], "--layers '1,x'"),
    (["train", "PROFILE=nope", "CACHE={cache}", "OUT={d}/m2"], "unknown profile 'nope'"),
    (["harvest", "PROFILE=tiny", "SET=harvest.batch_size=0", "CACHE={d}/m3"], "harvest.batch_size = 0"),
]


@pytest.mark.slow
@pytest.mark.parametrize("args, phrase", MAKE_CASES, ids=[c[0][0] + ":" + c[0][2] for c in MAKE_CASES])
def test_make_targets_pass_the_one_line_through(world, args, phrase):
    # -o: never reinstall here, whatever the stamp's age (the venv is already installed)
    p = subprocess.run(
        ["make", "-s", "--no-print-directory", "-o", ".venv/.installed", *_fill(args, world)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # make's own trailer: "make: ***", or "make[N]: ***" when the suite itself runs under make (CI's `make test`)
    lines = [ln for ln in p.stderr.strip().splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", ln)]
    assert p.returncode == 2 and lines and lines[-1].startswith("error: ") and phrase in lines[-1], p.stderr
    assert "Traceback" not in p.stderr


def _limited(max_bytes):
    def pre():  # writes past this size fail with EFBIG, like a full disk (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return pre


@pytest.mark.slow
def test_a_full_disk_during_harvest_and_train_is_one_line_and_keeps_what_was_committed(world, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    url = str(tmp_path / "h")
    harvest = [
        sys.executable,
        "-m",
        "harvest",
        "run",
        *TINY,
        "--cache",
        url,
        "--source",
        "corpus",
        "--layers",
        "1",
        "--quiet",
        "--set",
        "harvest.chunk_tokens=64",
    ]
    p = subprocess.run([*harvest, "--tokens", "256", "--set", "harvest.segment_sequences=2"], env=env, timeout=300)
    assert p.returncode == 0  # one small segment committed; then bigger ones meet a full disk
    p = subprocess.run(
        [*harvest, "--tokens", "4096", "--set", "harvest.segment_sequences=16"],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=_limited(40_000),
        timeout=300,
    )
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and last.startswith("error: cannot write ") and "Traceback" not in p.stderr, p.stderr
    assert "()" not in last and "File too large" in last
    from cache_format import ops

    before = cf.open_cache(url)  # what committed before the disk filled is intact
    assert before.n_tokens == 256 and ops.verify(before)[1] == []

    out = tmp_path / "run"
    train = [
        sys.executable,
        "-m",
        "train",
        "run",
        *TINY,
        "--cache",
        world["cache"],
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "train.checkpoint_every_tokens=64",
        "--set",
        "train.training_tokens=512",
    ]
    p = subprocess.run(train, capture_output=True, text=True, env=env, preexec_fn=_limited(4_000), timeout=300)
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    assert p.returncode == 2 and last.startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    leftovers = [f for _, _, fs in os.walk(out) for f in fs if ".tmp" in f]
    assert leftovers == []
