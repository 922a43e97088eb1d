"""Sources: the corpus packer over local files, question selection, and other model families."""

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cache_format.config import CorpusConfig, CorpusSource, ModelConfig, SuperGPQAConfig
from harvest import data, tiny
from harvest.model import load_model


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny.assets()))


def local_sources(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"alpha document number {i} about rivers and sand." for i in range(40)))
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"body": f"beta record {i}: the heart pumps blood through two circuits."}) + "\n")
    pq.write_table(pa.table({"text": [f"gamma row {i}, a prime has two divisors." for i in range(40)]}),
                   tmp_path / "c.parquet")
    return [CorpusSource("a", str(tmp_path / "a.txt"), 0.6), CorpusSource("b", str(tmp_path / "b.jsonl"), 0.3, "body"),
            CorpusSource("c", str(tmp_path / "c.parquet"), 0.1)]


def test_packing_is_a_deterministic_weighted_mixture_with_eos_separators(tmp_path, tok):
    cfg = CorpusConfig(sources=local_sources(tmp_path), seq_len=32, tokens=0, seed=3)
    eos = data.corpus_eos(tok)
    assert eos == tok.convert_tokens_to_ids("<|endoftext|>")
    seqs = list(data.pack_corpus(cfg, tok, eos))
    again = list(data.pack_corpus(cfg, tok, eos))
    assert [s.token_ids for s in seqs] == [s.token_ids for s in again]
    assert all(len(s.token_ids) == 32 for s in seqs) and [s.seq_index for s in seqs] == list(range(len(seqs)))
    flat = [t for s in seqs for t in s.token_ids]
    assert flat.count(eos) >= 100  # every document ends with the separator
    first = Counter(name for s in seqs[: len(seqs) // 3] for name, _ in s.docs)
    assert first["a"] > first["b"] > first["c"]  # early on, the draw follows the weights
    other = list(data.pack_corpus(CorpusConfig(sources=cfg.sources, seq_len=32, seed=4), tok, eos))
    assert [s.token_ids for s in other] != [s.token_ids for s in seqs]


def test_corpus_source_errors_are_one_line(tmp_path, tok):
    bad = CorpusConfig(sources=[CorpusSource("b", str(tmp_path / "missing.txt"))])
    with pytest.raises(data.DataError, match="does not exist"):
        next(data.pack_corpus(bad, tok, 0))
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hi"}) + "\n")
    bad = CorpusConfig(sources=[CorpusSource("x", str(tmp_path / "x.jsonl"))])
    with pytest.raises(data.DataError, match="no field 'text'"):
        next(data.pack_corpus(bad, tok, 0))


def test_questions_by_seed_extend_and_validate(tmp_path):
    rows = data.load_questions(SuperGPQAConfig(dataset="builtin:tiny"))
    assert len(rows) >= 24 and all(set(data.QUESTION_FIELDS) <= set(r) for r in rows)
    few, more = data.select_questions(rows, 5, 100), data.select_questions(rows, 10, 100)
    assert more[:5] == few and data.select_questions(rows, 5, 101) != few
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({**rows[0], "answer_letter": "J"}) + "\n")
    with pytest.raises(data.DataError, match="not one of its options"):
        data.load_questions(SuperGPQAConfig(dataset=str(bad)))
    prompt = data.format_question(rows[0], "answer-line")
    assert "A. " in prompt and "Answer: X" in prompt
    # the default is SuperGPQA's official zero-shot prompt: instruction first, then `A) option` lines
    official = data.format_question(rows[0])
    assert official.startswith("Answer the following multiple choice question.")
    assert official.endswith("\n".join(f"{'ABCDEFGHIJ'[i]}) {o}" for i, o in enumerate(rows[0]["options"])))
    assert f"\n\n{rows[0]['question']}\nA) " in official
    # every column of the dataset travels into the sequence record
    rec = data.question_record({**rows[0], "is_calculation": True})
    assert rec["is_calculation"] is True and rec["question"] == rows[0]["question"]
    assert json.loads(rec["options"]) == rows[0]["options"] and rec["gold"] == rows[0]["answer_letter"]


def test_a_saved_llama_style_model_loads_by_path_with_its_layers(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "llama" / name).write_bytes((tiny.assets() / name).read_bytes())
    lm = load_model(ModelConfig(name_or_path=str(tmp_path / "llama"), dtype="float32", device_map="cpu"))
    assert type(lm.model).__name__ == "LlamaForCausalLM" and lm.layers_path == "model.layers"
    assert lm.n_layers == 3 and lm.d_model == 32 and lm.provenance["resolved_path"] == str(tmp_path / "llama")
