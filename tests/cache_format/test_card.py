"""`card`: a Hub dataset card from the cache's provenance (cache_format/card.py)."""

from __future__ import annotations

from huggingface_hub import DatasetCard
from support import write_cache

import cache_format as cf
from cache_format import ops
from cache_format.stores import Location

META = {
    "model": {"name_or_path": "Qwen/Qwen3.6-27B", "revision": "v1", "commit": "abc123", "dtype": "bfloat16"},
    "hook": {"site": "resid_post", "meaning": "output of decoder layer N (0-based)", "module_path": "model.layers.N"},
    "source": {"name": "supergpqa", "dataset": "m-a-p/SuperGPQA", "revision": "", "split": "train", "seed": 100},
}


def test_the_card_carries_the_provenance_and_the_hub_reads_its_front_matter(tmp_path, run):
    url = str(tmp_path / "c")
    write_cache(url, layers=(11, 31), segments=(40, 25), meta=META)
    c = cf.open_cache(url)
    out = tmp_path / "README.md"
    code, _, err = run("card", url, "--repo", "org/acts", "--path", "cache", "--license", "apache-2.0", "--out", out)
    assert code == 0, err
    card = DatasetCard.load(out)  # huggingface_hub's own parser
    assert card.data.license == "apache-2.0" and card.data.viewer is False
    assert card.data.size_categories == ["n<1K"] and card.data.source_datasets == ["m-a-p/SuperGPQA"]
    assert "sparse-autoencoders" in card.data.tags
    text = card.text
    for want in (
        "`Qwen/Qwen3.6-27B` @ `v1`, commit `abc123`",
        "`resid_post`: output of decoder layer N (0-based) (`model.layers.N`)",
        "| layers | 11, 31 (d_model 16) |",
        "| tokens | 65 rows in 2 segments |",
        "| sequences | 7 |",
        "`m-a-p/SuperGPQA`",
        "codec `blosc-zstd1`",
        f"| cache | `{c.fingerprint}` |",
        f"| layer 11 | `{c.layer_fingerprint(11)}` |",
        f"| layer 31 | `{c.layer_fingerprint(31)}` |",
        'cf.open_cache("hf://datasets/org/acts/cache")',
        "https://huggingface.co/datasets/org/acts/resolve/main/cache",
    ):
        assert want in text, want


def test_a_card_needs_its_repo_unless_read_from_the_hub(tmp_path, run, hub_serve, monkeypatch):
    url = str(tmp_path / "repo" / "c")
    write_cache(url, meta=META)
    code, out, err = run("card", url)
    assert code == 2 and err.startswith("error: card: name the Hub dataset repo") and not out
    ops.publish(Location(url))
    endpoint, hub = hub_serve()
    hub.push("org/acts", tmp_path / "repo")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    code, out, err = run("card", "hf://datasets/org/acts/c")
    assert code == 0 and 'cf.open_cache("hf://datasets/org/acts/c")' in out, err
