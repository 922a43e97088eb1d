"""The corpus stage: streaming readers of local files, packing, token-share mixing, restarts from a
recorded state with no re-reads, and hub revisions resolved once and kept by a resume."""

import itertools
import json
import os
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harvest import corpus, tiny
from harvest.config import CorpusConfig, CorpusSource
from harvest.records import DataError


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny.assets()))


def local_sources(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"alpha document number {i} about rivers and sand." for i in range(40)))
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"body": f"beta record {i}: the heart pumps blood through two circuits."}) + "\n")
    pq.write_table(
        pa.table({"text": [f"gamma row {i}, a prime has two divisors." for i in range(40)]}), tmp_path / "c.parquet"
    )
    return [
        CorpusSource("a", str(tmp_path / "a.txt"), 0.6),
        CorpusSource("b", str(tmp_path / "b.jsonl"), 0.3, "body"),
        CorpusSource("c", str(tmp_path / "c.parquet"), 0.1),
    ]


def test_packing_is_a_deterministic_weighted_mixture_with_eos_separators(tmp_path, tok):
    cfg = CorpusConfig(sources=local_sources(tmp_path), seq_len=32, seed=3)  # pack_corpus streams: tokens is unused
    eos = corpus.corpus_eos(tok)
    assert eos == tok.convert_tokens_to_ids("<|endoftext|>")
    seqs = list(corpus.pack_corpus(cfg, tok, eos))
    again = list(corpus.pack_corpus(cfg, tok, eos))
    assert [s.token_ids.tolist() for s in seqs] == [s.token_ids.tolist() for s in again]
    assert all(len(s.token_ids) == 32 for s in seqs) and [s.seq_index for s in seqs] == list(range(len(seqs)))
    flat = [t for s in seqs for t in s.token_ids.tolist()]
    assert flat.count(eos) >= 100  # every document ends with the separator
    first = Counter(name for s in seqs[: len(seqs) // 3] for name, _ in s.docs)
    assert first["a"] > first["b"] > first["c"]  # early on, the draw follows the weights
    other = list(corpus.pack_corpus(CorpusConfig(sources=cfg.sources, seq_len=32, seed=4), tok, eos))
    assert [s.token_ids.tolist() for s in other] != [s.token_ids.tolist() for s in seqs]


def uneven_sources(tmp_path):
    """Long documents at weight 0.7, middling at 0.2, short at 0.1 (OpenThoughts-like skew the other way too)."""
    (tmp_path / "short.txt").write_text("\n\n".join(f"short note {i}." for i in range(3000)))
    with open(tmp_path / "long.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": " ".join(f"long trace {i} step {j} holds." for j in range(60))}) + "\n")
    pq.write_table(
        pa.table({"text": [f"middle row {i}: " + "a prime has two divisors. " * 4 for i in range(2000)]}),
        tmp_path / "mid.parquet",
        row_group_size=100,
    )
    return [
        CorpusSource("short", str(tmp_path / "short.txt"), 0.1),
        CorpusSource("long", str(tmp_path / "long.jsonl"), 0.7),
        CorpusSource("mid", str(tmp_path / "mid.parquet"), 0.2),
    ]


def shares(seqs):
    rows = Counter()
    for s in seqs:
        rows.update(s.rows)
    total = sum(rows.values())
    return {k: v / total for k, v in rows.items()}


def test_weights_are_token_shares_and_per_document_draws_stay_an_option(tmp_path, tok):
    srcs = uneven_sources(tmp_path)
    srcs = [srcs[1], srcs[2], srcs[0]]  # 70 long / 20 middling / 10 short
    cfg = CorpusConfig(sources=srcs, seq_len=64, seed=0)
    seqs = list(itertools.islice(corpus.pack_corpus(cfg, tok, corpus.corpus_eos(tok)), 600))
    got = shares(seqs)
    for name, want in (("long", 0.7), ("mid", 0.2), ("short", 0.1)):
        assert abs(got[name] - want) < 0.02, got
    per_doc = CorpusConfig(sources=srcs, seq_len=64, seed=0, mix="documents")
    got = shares(itertools.islice(corpus.pack_corpus(per_doc, tok, corpus.corpus_eos(tok)), 600))
    assert got["long"] > 0.85, got  # a per-document draw over-weights long documents
    with pytest.raises(DataError, match="corpus.mix"):
        next(corpus.pack_corpus(CorpusConfig(sources=srcs, mix="words"), tok, 0))


def test_a_planner_restarted_from_a_recorded_state_continues_exactly(tmp_path, tok):
    import json as js

    cfg = CorpusConfig(
        sources=uneven_sources(tmp_path) + [CorpusSource("tiny", "builtin:tiny", 0.3)], seq_len=48, seed=5
    )
    eos = corpus.corpus_eos(tok)
    p = corpus.CorpusPlanner(cfg, tok, eos, threads=2)
    states, seqs = {}, []
    for i in range(120):
        seqs.append(p.next_sequence())
        states[i + 1] = js.loads(js.dumps(p.state()))  # what a segment's meta holds
    p.close()
    opened = [m for m, st in states.items() if st["open"] and st["open"][2] > 0]
    assert opened, "no boundary fell inside a document"
    for m in (1, opened[0], opened[-1], 77):
        q = corpus.CorpusPlanner(cfg, tok, eos, state=states[m], threads=1)
        again = [q.next_sequence() for _ in range(120 - m)]
        q.close()
        assert [s.seq_index for s in again] == list(range(m, 120))
        assert [s.token_ids.tolist() for s in again] == [s.token_ids.tolist() for s in seqs[m:]]
        assert [s.docs for s in again] == [s.docs for s in seqs[m:]]


def test_local_readers_stream_and_skip_by_document(tmp_path):
    srcs = {s.name: s for s in uneven_sources(tmp_path)}
    (tmp_path / "gaps.txt").write_text("one\nline two\n\n\n\nthree  \n\n four\n")
    assert list(corpus.iter_documents(CorpusSource("g", str(tmp_path / "gaps.txt")), 0)) == [
        "one\nline two",
        "three",
        "four",
    ]
    for name in ("short", "long", "mid"):
        whole = list(corpus.iter_documents(srcs[name], 0))
        assert list(corpus.iter_documents(srcs[name], 0, skip=250)) == whole[250:]
    assert len(list(corpus.iter_documents(srcs["mid"], 0, skip=1999))) == 1  # parquet: skipped row groups unread
    with pytest.raises(DataError, match="no column 'body'"):
        next(corpus.iter_documents(CorpusSource("m", srcs["mid"].path, text_field="body"), 0))
    with pytest.raises(DataError, match="hub datasets only"):
        next(corpus.iter_documents(CorpusSource("m", srcs["mid"].path, revision="v1"), 0))


def test_corpus_source_errors_are_one_line(tmp_path, tok):
    bad = CorpusConfig(sources=[CorpusSource("b", str(tmp_path / "missing.txt"))])
    with pytest.raises(DataError, match="does not exist"):
        next(corpus.pack_corpus(bad, tok, 0))
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hi"}) + "\n")
    bad = CorpusConfig(sources=[CorpusSource("x", str(tmp_path / "x.jsonl"))])
    with pytest.raises(DataError, match=r"x.jsonl:1 has no field 'text'"):
        next(corpus.pack_corpus(bad, tok, 0))


@pytest.mark.parametrize(
    "record, phrase",
    [
        (5, r"bad.jsonl:3: a JSON number where an object was expected"),
        ("text", r"bad.jsonl:3: a JSON string where an object"),
        ({"text": None}, r"bad.jsonl:3: 'text' is null, not text"),
        ({"text": 42}, r"bad.jsonl:3: 'text' is a number, not text"),
        ({"text": {"a": 1}}, r"bad.jsonl:3: 'text' is an object, not text"),
        ({"text": [{"value": "hi"}, None]}, r"bad.jsonl:3: a turn of 'text' is null, not text"),
    ],
)
def test_a_record_that_is_not_text_is_refused_naming_its_line(tmp_path, record, phrase):
    good = json.dumps({"text": "a fine document."})
    (tmp_path / "bad.jsonl").write_text(f"{good}\n\n{json.dumps(record)}\n{good}\n")  # line 2 blank
    with pytest.raises(DataError, match=phrase):
        list(corpus.iter_documents(CorpusSource("b", str(tmp_path / "bad.jsonl")), 0))


def test_chat_turns_are_joined_and_a_null_in_parquet_names_its_row(tmp_path):
    turns = [{"from": "user", "value": "hello"}, {"role": "assistant", "content": "hi there"}, "and a plain turn"]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"c": turns}) + "\n")
    assert list(corpus.iter_documents(CorpusSource("c", str(tmp_path / "chat.jsonl"), text_field="c"), 0)) == [
        "hello\n\nhi there\n\nand a plain turn"
    ]
    pq.write_table(pa.table({"text": ["one", None, "three"]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n.parquet row 1: 'text' is null"):
        list(corpus.iter_documents(CorpusSource("n", str(tmp_path / "n.parquet")), 0))


def test_bytes_that_are_not_utf8_are_refused_naming_line_and_column(tmp_path):
    (tmp_path / "l1.txt").write_bytes("first document\n\nsecond, caf\xe9 here\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"l1.txt:3: byte 0xe9 at column 12 is not UTF-8; convert the file"):
        list(corpus.iter_documents(CorpusSource("l", str(tmp_path / "l1.txt")), 0))
    (tmp_path / "l1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"l1.jsonl:2: byte 0xe9 at column 14"):
        list(corpus.iter_documents(CorpusSource("l", str(tmp_path / "l1.jsonl")), 0))
    # valid UTF-8 (and Windows line ends) reads as before
    (tmp_path / "u.txt").write_bytes("café 東京 🙂\r\nline two\r\n\r\nnext".encode())
    assert list(corpus.iter_documents(CorpusSource("u", str(tmp_path / "u.txt")), 0)) == [
        "café 東京 🙂\nline two",
        "next",
    ]


def _planned(tokens: int, done: set[int], seq_len: int = 128, per: int = 16):
    from harvest.config import load_config

    cfg = load_config(
        None,
        "tiny",
        [f"harvest.segment_sequences={per}", f"corpus.seq_len={seq_len}"],
        **{"corpus.tokens": tokens, "harvest.source": "corpus"},
    )
    return corpus.PlannedUnits(cfg, None, done, [])


def test_what_is_left_is_counted_from_the_cache_not_by_walking_every_sequence():
    for tokens, done in [
        (128 * 100, set()),
        (128 * 100, set(range(16))),  # the first unit whole
        (128 * 100, set(range(8)) | {50, 99, 300}),  # parts of units, and one past the run's end
        (128 * 100 - 5, set(range(96, 100))),  # the last, short unit whole (100 sequences, 16 a unit)
        (128 * 100, set(range(100))),
    ]:
        p = _planned(tokens, done)
        n_seq = -(-tokens // 128)
        missing = [i for i in range(n_seq) if i not in done]  # the plain definition, affordable here
        assert (p.n_seq, len(p), p.n_missing) == (n_seq, len({i // 16 for i in missing}), len(missing))
        assert p.n_tokens == len(missing) * 128


def test_planning_bookkeeping_is_flat_in_tokens():
    """--tokens 1e9 once built a list over all 7.8M sequences (300 MiB); 1e20 never finished."""
    import time
    import tracemalloc

    peaks = {}
    for tokens in (10**6, 10**9, 10**18):
        tracemalloc.start()
        t0 = time.monotonic()
        p = _planned(tokens, set(range(40)))
        seconds = time.monotonic() - t0
        peaks[tokens] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert seconds < 5 and p.n_missing == p.n_seq - 40
    assert max(peaks.values()) < 1 << 20, peaks  # under 1 MiB at any TOKENS


def test_tokens_beyond_what_local_files_can_give_are_refused_before_planning(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 100)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "y" * 80}) + "\n")
    srcs = [CorpusSource("a", str(tmp_path / "a.txt")), CorpusSource("b", str(tmp_path / "b.jsonl"))]
    size = sum(os.path.getsize(s.path) for s in srcs)
    most = corpus.MAX_TOKENS_PER_BYTE * size
    corpus.check_tokens(CorpusConfig(sources=srcs, tokens=most))
    with pytest.raises(DataError, match=rf"a.txt, .*b.jsonl \({size} bytes\) give at most {most:,} tokens"):
        corpus.check_tokens(CorpusConfig(sources=srcs, tokens=most + 1))
    # a source of unknown size (the bundled corpus cycles; hub streams; parquet) bounds nothing
    endless = [*srcs, CorpusSource("t", "builtin:tiny")]
    corpus.check_tokens(CorpusConfig(sources=endless, tokens=10**18))
    # a weight-0 source gives nothing
    corpus.check_tokens(CorpusConfig(sources=[*srcs, CorpusSource("t", "builtin:tiny", 0.0)], tokens=most))
    with pytest.raises(DataError, match="more than the corpus sources can give"):
        corpus.check_tokens(CorpusConfig(sources=[*srcs, CorpusSource("t", "builtin:tiny", 0.0)], tokens=most + 1))


def test_a_70_20_10_harvest_shows_its_measured_token_shares_in_info_and_the_report(tmp_path):
    from analysis_data import exported_run
    from click.testing import CliRunner

    from cache_format.cli import cli
    from harvest import run as hr
    from harvest.config import load_config
    from train.analysis.report import render_report

    srcs = uneven_sources(tmp_path)
    table = ", ".join(f'{{name="{s.name}", path="{s.path}", weight={w}}}' for s, w in zip(srcs, (0.1, 0.7, 0.2)))
    url = str(tmp_path / "mix")
    cfg = load_config(
        None,
        "tiny",
        [f"corpus.sources=[{table}]", "harvest.segment_sequences=64", "harvest.batch_size=64"],
        **{"harvest.cache": url, "harvest.source": "corpus", "harvest.layers": [0], "corpus.tokens": 256 * 128},
    )
    hr.run(cfg, progress=False)
    out = CliRunner().invoke(cli, ["info", url, "--json"])
    rows = json.loads(out.output)["rows_by_source"]
    assert sum(rows.values()) == 256 * 128
    for name, want in (("long", 0.7), ("mid", 0.2), ("short", 0.1)):
        assert abs(rows[name] / (256 * 128) - want) < 0.02, rows
    text = CliRunner().invoke(cli, ["info", url]).output
    assert "sources      long 70." in text and "(weight 70%)" in text, text
    run_dir, _, _ = exported_run(tmp_path / "r", trajectory=[], metrics={})
    run = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**run, "cache": url}))
    page = render_report(run_dir).read_text()
    assert "source token shares" in page and f"long {rows['long'] / (256 * 128):.1%}" in page


def test_sources_that_run_out_stop_the_run_in_one_line_after_committing_what_they_filled(tmp_path):
    import cache_format as cf
    from harvest import run as hr
    from harvest.config import load_config

    (tmp_path / "few.txt").write_text("\n\n".join(f"a short document, number {i}." for i in range(200)))
    url = str(tmp_path / "out")
    cfg = load_config(
        None,
        "tiny",
        [
            f'corpus.sources=[{{name="few", path="{tmp_path / "few.txt"}"}}]',
            "harvest.segment_sequences=8",
            "harvest.batch_size=8",
        ],
        # within what the file's size allows (6 KB, 4 tokens a byte at most), more than it holds
        **{"harvest.cache": url, "harvest.source": "corpus", "harvest.layers": [0], "corpus.tokens": 16 * 1024},
    )
    with pytest.raises(DataError, match=r"ran out after \d+ sequences of 128 tokens; lower --tokens"):
        hr.run(cfg, progress=False)
    c = cf.open_cache(url)
    assert c.n_tokens > 0 and c.n_tokens % (8 * 128) == 0


def test_a_bad_record_stops_the_run_in_one_line_after_committing_the_units_before_it(tmp_path):
    """Fix the record, re-run: the cache ends as one clean run's (nothing committed is lost)."""
    import cache_format as cf
    from harvest import run as hr
    from harvest.config import load_config

    docs = [json.dumps({"text": f"a short document, number {i}."}) for i in range(700)]
    src = tmp_path / "docs.jsonl"

    def cfg(url):
        return load_config(
            None,
            "tiny",
            [f'corpus.sources=[{{name="d", path="{src}"}}]', "harvest.segment_sequences=4", "harvest.batch_size=8"],
            **{"harvest.cache": str(url), "harvest.source": "corpus", "harvest.layers": [0], "corpus.tokens": 48 * 128},
        )

    src.write_text("\n".join([*docs[:600], "5", *docs[600:]]) + "\n")
    with pytest.raises(DataError, match=r"docs.jsonl:601: a JSON number where an object was expected"):
        hr.run(cfg(tmp_path / "c"), progress=False)
    before = cf.open_cache(str(tmp_path / "c"))
    assert 0 < before.n_tokens < 48 * 128 and before.n_tokens % (4 * 128) == 0  # whole units only
    src.write_text("\n".join([*docs[:600], docs[0], *docs[600:]]) + "\n")  # the fix: a document on that line
    again = hr.run(cfg(tmp_path / "c"), progress=False)
    assert again["sequences_done_before"] == before.n_tokens // 128
    clean = hr.run(cfg(tmp_path / "clean"), progress=False)
    assert again["n_tokens"] == 48 * 128 and again["fingerprint"] == clean["fingerprint"]


def test_the_batched_tokenizer_gives_the_ids_of_one_call_per_document(tok):
    docs = [d.strip() for d in (tiny.assets() / "corpus.txt").read_text().split("\n\n") if d.strip()]
    docs += ["", "  spaces  and\ttabs\n", "émigré naïve 東京 🙂", "<|endoftext|> inside"]
    got = corpus.batch_tokenizer(tok, 7)(docs)
    want = [tok(d, add_special_tokens=False)["input_ids"] + [7] for d in docs]
    assert [g.tolist() for g in got] == want


def test_a_complete_corpus_cache_reads_no_source_on_rerun_or_when_a_layer_is_added(tmp_path):
    import cache_format as cf
    from harvest import run as hr
    from harvest.config import load_config

    src = tmp_path / "docs.txt"
    src.write_text("\n\n".join(f"document {i} says something about the number {i * 7}." for i in range(400)))
    url = str(tmp_path / "out")

    def cfg(layers):
        return load_config(
            None,
            "tiny",
            [f'corpus.sources=[{{name="docs", path="{src}"}}]', "harvest.segment_sequences=4", "harvest.batch_size=8"],
            **{"harvest.cache": url, "harvest.source": "corpus", "harvest.layers": layers, "corpus.tokens": 8 * 128},
        )

    first = hr.run(cfg([0]), progress=False)
    src.unlink()  # a source that is gone cannot be streamed: nothing may try
    again = hr.run(cfg([0]), progress=False)
    assert again["units"] == 0 and again["n_tokens"] == first["n_tokens"] == 8 * 128
    added = hr.run(cfg([2]), progress=False)
    assert added["added_layers"] == [2] and added["units"] == 0 and cf.open_cache(url).layers == [0, 2]


# -- hub revisions


@pytest.fixture
def fake_hub(monkeypatch):
    """A loopback server answering the hub's dataset-info API: {repo: {revision: sha}}."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import unquote

    commits = {"org/web": {"": "a" * 40, "main": "a" * 40, "v2": "b" * 40}}
    asked = []

    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            parts = unquote(self.path.split("?")[0]).split("/")  # /api/datasets/org/web[/revision/REV]
            repo, rev = "/".join(parts[3:5]), parts[6] if len(parts) > 6 else ""
            asked.append((repo, rev))
            sha = commits.get(repo, {}).get(rev)
            body = json.dumps({"id": repo, "sha": sha} if sha else {"error": "not found"}).encode()
            self.send_response(200 if sha else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield commits, asked
    server.shutdown()


def test_hub_revisions_resolve_once_then_resume_reuses_the_recorded_commit(tmp_path, fake_hub):
    import numpy as np
    import torch

    import cache_format as cf
    from cache_format.errors import UserError

    commits, asked = fake_hub
    local = CorpusSource("local", str(tmp_path / "a.txt"))
    hub = CorpusSource("web", "org/web")
    pins = corpus.pin_revisions([local, hub], [])
    assert pins == {1: {"requested": "", "commit": "a" * 40}} and asked == [("org/web", "")]
    # a segment records the pins; the upstream branch moves; a resume keeps the recorded commit
    w = cf.create_cache(str(tmp_path / "c"), d_model=4, layers=[0], meta={"model": {"name_or_path": "t"}})
    with w.segment(meta={"plan": {"next_seq": 1, "revisions": {"web": pins[1]}}}) as seg:
        seg.append(
            {0: torch.zeros(2, 4, dtype=torch.bfloat16)},
            tokens=np.zeros(2, np.int32),
            seq_ids=np.zeros(2, np.int64),
            positions=np.arange(2, dtype=np.int32),
        )
    commits["org/web"][""] = "c" * 40
    segs = cf.open_cache(str(tmp_path / "c")).segments
    assert corpus.pin_revisions([hub], segs)[0]["commit"] == "a" * 40 and len(asked) == 1
    assert corpus.pin_revisions([CorpusSource("web", "org/web", revision="a" * 40)], segs)[0]["commit"] == "a" * 40
    with pytest.raises(UserError, match="harvested at revision 'main'.*not 'v2'"):
        corpus.pin_revisions([CorpusSource("web", "org/web", revision="v2")], segs)
    assert corpus.pin_revisions([CorpusSource("web", "org/web", revision="v2")], [])[0]["commit"] == "b" * 40
    with pytest.raises(UserError, match="cannot resolve the revision 'nope'"):
        corpus.pin_revisions([CorpusSource("web", "org/web", revision="nope")], [])


def test_a_hub_supergpqa_is_pinned_to_its_commit_and_a_local_file_is_not(fake_hub, tmp_path):
    from harvest.records import pin_dataset

    commits, asked = fake_hub
    commits["m-a-p/SuperGPQA"] = {"main": "d" * 40}
    pin = pin_dataset("m-a-p/SuperGPQA", "main", None)
    assert pin == {"requested": "main", "commit": "d" * 40} and asked[-1] == ("m-a-p/SuperGPQA", "main")
    commits["m-a-p/SuperGPQA"]["main"] = "e" * 40  # upstream moves: the cache's record wins
    assert pin_dataset("m-a-p/SuperGPQA", "main", pin)["commit"] == "d" * 40 and len(asked) == 1
    local = tmp_path / "q.jsonl"
    local.write_text("")
    assert pin_dataset(str(local), "main", None) is None and pin_dataset("builtin:tiny", "", None) is None


def test_hub_only_keys_on_a_local_file_are_refused(tmp_path):
    """`subset` names a hub dataset's config: on a local file it would be silently ignored."""
    (tmp_path / "a.txt").write_text("one document.\n\nanother.\n")
    with pytest.raises(DataError, match="subset 'sample-10BT' applies to hub datasets only"):
        next(corpus.iter_documents(CorpusSource("a", str(tmp_path / "a.txt"), subset="sample-10BT"), 0))
    assert list(corpus.iter_documents(CorpusSource("a", str(tmp_path / "a.txt")), 0)) == ["one document.", "another."]
