"""pipeline.toml: precedence, profiles, typed --set overrides and one-line errors."""

import textwrap

import pytest

from cache_format.config import ConfigError, load_config, parse_layers


def write(tmp_path, text):
    p = tmp_path / "pipeline.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_shipped_config_is_the_real_run(tmp_path):
    cfg = load_config()
    assert cfg.model.name_or_path == "Qwen/Qwen3.6-27B"
    assert cfg.harvest.layers == [11, 31, 55]
    assert [s.weight for s in cfg.corpus.sources] == [0.7, 0.2, 0.1]
    from train.recipe import resolve

    corpus, name = resolve(cfg, {"source": {"name": "corpus"}})
    assert name == "corpus" and (corpus.d_sae, corpus.k, corpus.k_aux) == (65536, 128, 2560)
    assert (corpus.training_tokens, corpus.epochs, corpus.heldout_fraction) == (200_000_000, 0, 0.01)
    rollouts, name = resolve(cfg, {"source": {"name": "supergpqa"}})
    assert name == "rollouts" and (rollouts.d_sae, rollouts.k, rollouts.lr, rollouts.batch_size) == (4096, 32, 3e-4, 4096)
    assert (rollouts.epochs, rollouts.max_rows, rollouts.heldout_fraction) == (20, 200_000, 0.1)
    assert resolve(cfg, {"import": {}})[1] == "corpus"  # an imported dump has no source: the 001 recipe
    # the dataclass defaults hold the same recipes when no pipeline.toml carries them
    assert load_config(write(tmp_path, "")).recipes.rollouts == cfg.recipes.rollouts


def test_precedence_file_then_profile_then_set_then_flags(tmp_path):
    p = write(tmp_path, """
        [train]
        k = 8
        d_sae = 64
        [profile.small.train]
        k = 4
        """)
    assert load_config(p).train.k == 8
    assert load_config(p, profile="small").train.k == 4
    cfg = load_config(p, profile="small", overrides=["train.k=2"])
    assert cfg.train.k == 2 and cfg.train.d_sae == 64
    cfg = load_config(p, profile="small", overrides=["train.k=2"], **{"train.k": 1, "train.lr": None})
    assert cfg.train.k == 1 and cfg.train.lr == 2e-4


def test_set_takes_toml_literals_and_bare_strings_only_for_strings(tmp_path):
    p = write(tmp_path, "")
    cfg = load_config(p, overrides=["harvest.layers=[1, 2]", "harvest.cache=runs/x", "train.lr=1e-3"])
    assert cfg.harvest.layers == [1, 2] and cfg.harvest.cache == "runs/x" and cfg.train.lr == 1e-3
    with pytest.raises(ConfigError, match="not a TOML literal"):
        load_config(p, overrides=["train.k=abc"])
    with pytest.raises(ConfigError, match="section"):
        load_config(p, overrides=["k=3"])


def test_layers_accept_comma_separated_strings(tmp_path):
    cfg = load_config(write(tmp_path, ""), **{"harvest.layers": "1,3,5"})
    assert cfg.harvest.layers == [1, 3, 5]
    assert parse_layers("11,31,55") == [11, 31, 55] and parse_layers(None) is None
    with pytest.raises(ConfigError, match="comma-separated"):
        parse_layers("11,x")


@pytest.mark.parametrize(
    "text, message",
    [
        ("[train]\nkk = 1\n", "unknown key 'kk'"),
        ("[trian]\nk = 1\n", "unknown key 'trian'"),
        ("[train]\nk = 'eight'\n", "expected an integer"),
        ("[train]\nnormalize = 1\n", "expected true or false"),
        ("[train\nk = 1\n", "malformed TOML"),
        ("[[corpus.sources]]\nname = 'x'\nwieght = 1\n", "unknown key 'wieght'"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(write(tmp_path, text))
    assert "\n" not in str(e.value)


def test_unknown_profile_and_missing_file(tmp_path):
    p = write(tmp_path, "[profile.a.train]\nk = 1\n")
    with pytest.raises(ConfigError, match="unknown profile 'b'.*known: a"):
        load_config(p, profile="b")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_tiny_profile_loads():
    cfg = load_config(profile="tiny")
    assert cfg.model.name_or_path == "builtin:tiny" and cfg.profile == "tiny"
    assert cfg.train.k < cfg.train.d_sae
