"""harvest.config: harvest's sections as shipped, what its loader accepts, and defaults written
once (in the schema: a toml that leaves a key out gets what pipeline.toml documents)."""

import textwrap

from cache_format.config import shipped_config
from harvest.config import load_config


def test_shipped_config_is_the_real_run_for_harvest():
    cfg = load_config()
    assert cfg.model.name_or_path == "Qwen/Qwen3.6-27B"
    assert cfg.harvest.layers == [11, 31, 55]
    assert [s.weight for s in cfg.corpus.sources] == [0.7, 0.2, 0.1]


def test_layers_accept_comma_separated_strings(tmp_path):
    p = tmp_path / "pipeline.toml"
    p.write_text(textwrap.dedent(""))
    cfg = load_config(p, **{"harvest.layers": "1,3,5"})
    assert cfg.harvest.layers == [1, 3, 5]


def test_tiny_profile_loads_for_harvest():
    cfg = load_config(profile="tiny")
    assert cfg.model.name_or_path == "builtin:tiny" and cfg.profile == "tiny"


def test_a_toml_without_mix_window_harvests_mixed_rows(tmp_path):
    """`mix_window` was 0 in the schema and 256 in pipeline.toml: a user's toml that left it out
    got unmixed rows. The schema's default is the one pipeline.toml documents."""
    import cache_format as cf
    from harvest.run import run

    lines = shipped_config().read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith("mix_window")]
    assert len(kept) == len(lines) - 1
    p = tmp_path / "pipeline.toml"
    p.write_text("".join(kept))
    flags = {"harvest.cache": str(tmp_path / "c"), "harvest.source": "corpus", "harvest.layers": [0]}
    flags["corpus.tokens"] = 256
    cfg = load_config(p, "tiny", ["corpus.seq_len=32", "harvest.segment_sequences=8"], **flags)
    assert cfg.harvest.mix_window == 256 and "mix_window" not in cfg.keys_set["harvest"]
    run(cfg, progress=False)
    c = cf.open_cache(str(tmp_path / "c"))
    assert c.meta["harvest"]["mix_window"] == 256
    assert [s.meta["mix"]["window"] for s in c.segments] == [256]
