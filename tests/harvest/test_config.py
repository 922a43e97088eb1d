"""harvest.config: harvest's sections as shipped, and what its loader accepts."""

import textwrap

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


def test_tiny_profile_loads():
    cfg = load_config(profile="tiny")
    assert cfg.model.name_or_path == "builtin:tiny" and cfg.profile == "tiny"
