"""train.config: train's sections as shipped (the recipes follow the cache's source)."""

import textwrap

from train.config import load_config


def write(tmp_path, text):
    p = tmp_path / "pipeline.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_shipped_config_is_the_real_run(tmp_path):
    cfg = load_config()
    from train.recipe import resolve

    corpus, name = resolve(cfg, {"source": {"name": "corpus"}})
    assert name == "corpus" and (corpus.d_sae, corpus.k, corpus.k_aux) == (65536, 128, 2560)
    assert (corpus.training_tokens, corpus.epochs, corpus.heldout_fraction) == (200_000_000, 0, 0.01)
    rollouts, name = resolve(cfg, {"source": {"name": "supergpqa"}})
    assert name == "rollouts"
    assert (rollouts.d_sae, rollouts.k, rollouts.lr, rollouts.batch_size) == (4096, 32, 3e-4, 4096)
    assert (rollouts.epochs, rollouts.max_rows, rollouts.heldout_fraction) == (20, 200_000, 0.1)
    assert resolve(cfg, {"import": {}})[1] == "corpus"  # an imported dump has no source: the 001 recipe
    # the dataclass defaults hold the same recipes when no pipeline.toml carries them
    assert load_config(write(tmp_path, "")).recipes.rollouts == cfg.recipes.rollouts


def test_tiny_profile_loads():
    cfg = load_config(profile="tiny")
    assert cfg.profile == "tiny"
    assert cfg.train.k < cfg.train.d_sae
