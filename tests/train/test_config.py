"""train.config: train's sections as shipped (the recipes follow the cache's source).

Recipes follow the cache: which one is chosen, how it layers under [train], and how a small
cache's run is fitted.
"""

import textwrap

import pytest

from cache_format.config import ConfigError
from cache_format.errors import UserError
from train.config import load_config


def test_shipped_config_is_the_real_run(tmp_path):
    cfg = load_config()
    from train.config import resolve

    corpus, name = resolve(cfg, {"source": {"name": "corpus"}})
    assert name == "corpus" and (corpus.d_sae, corpus.k, corpus.k_aux) == (65536, 128, 0)  # 0: d_model // 2
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


def test_pipeline_toml_documents_the_kind_keys_at_their_schema_defaults():
    """The [train] comment block shows every kind key with its TrainConfig default, so the two cannot drift."""
    import re
    import tomllib
    from pathlib import Path

    from train.config import KIND_KEYS, TrainConfig

    text = (Path(__file__).resolve().parents[2] / "pipeline.toml").read_text()
    train = text.split("\n[train]", 1)[1].split("\n[", 1)[0]
    shown = dict(re.findall(r"^# (\w+) = (.+?)\s+#", train, re.M))
    assert set(KIND_KEYS) - {"k"} | {"architecture"} <= set(shown)
    for key, literal in shown.items():
        assert tomllib.loads(f"v = {literal}")["v"] == getattr(TrainConfig(), key), key


def test_sweep_entries_inherit_and_resolve_each_kind():
    from train.config import SweepSetting, TrainConfig

    tc = TrainConfig(
        architecture="jumprelu",
        d_sae=4096,
        sparsity_coefficient=3.0,
        sweep=[
            SweepSetting(architecture="batchtopk", k=32),
            SweepSetting(architecture="matryoshka", k=16),
            SweepSetting(architecture="relu"),  # another kind's L1 scale: the default, not [train]'s L0 one
            SweepSetting(jumprelu_bandwidth=0.2),  # [train]'s kind, its coefficient
        ],
    )
    base, btk, mat, relu, jr = tc.saes()
    assert (base.architecture, base.d_sae, base.k, base.sparsity_coefficient) == ("jumprelu", 4096, None, 3.0)
    assert (btk.d_sae, btk.k, btk.sparsity_coefficient, btk.matryoshka_sizes) == (4096, 32, None, None)
    assert mat.matryoshka_sizes == [512, 1024, 2048, 4096]  # the default nesting: d_sae/8, /4, /2, d_sae
    assert relu.sparsity_coefficient == 1.0 and relu.jumprelu_bandwidth is None
    assert (jr.architecture, jr.sparsity_coefficient, jr.jumprelu_bandwidth) == ("jumprelu", 3.0, 0.2)


def test_config_command_prints_the_effective_config_with_docs_that_loads_back(tmp_path):
    import tomllib

    from click.testing import CliRunner

    from train.cli import cli

    r = CliRunner().invoke(cli, ["config", "--profile", "tiny", "--set", "train.k=7", "--layers", "2,4"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    doc = tomllib.loads(r.output)
    assert doc["train"]["k"] == 7 and doc["train"]["layers"] == [2, 4] and doc["train"]["out"] == "runs/tiny"
    above_lr = r.output.split("\nlr = ")[0].splitlines()[-1]
    assert above_lr == "# peak learning rate; 0 = scale with width, as sparsify does"
    assert set(doc) == {"train", "recipes", "analysis", "harvest"}
    effective = tmp_path / "effective.toml"
    effective.write_text(r.output)
    want = load_config(profile="tiny", overrides=["train.k=7", "train.layers=[2, 4]"])
    got = load_config(effective)
    assert (got.train, got.recipes, got.analysis) == (want.train, want.recipes, want.analysis)


def write(tmp_path, text):
    tmp_path.mkdir(parents=True, exist_ok=True)
    p = tmp_path / "pipeline.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_recipe_keys_yield_to_train_keys_and_set(tmp_path):
    from train.config import resolve
    from train.run import budget, fit_to_run

    p = write(
        tmp_path,
        """
        [train]
        k = 16
        [recipes.rollouts]
        k = 8
        d_sae = 64
        epochs = 3.0
        """,
    )
    rollout = {"source": {"name": "supergpqa"}}
    tc, _ = resolve(load_config(p), rollout)
    assert (tc.k, tc.d_sae, tc.epochs) == (16, 64, 3.0) and budget(tc, 1000) == 3000
    tc, _ = resolve(load_config(p, overrides=["train.training_tokens=500"]), rollout)
    assert tc.epochs == 0 and budget(tc, 1000) == 500  # typing a budget clears the recipe's epochs
    tc, _ = resolve(load_config(p, overrides=["train.training_tokens=500", "train.epochs=2.0"]), rollout)
    assert budget(tc, 1000) == 2000  # both typed: epochs wins, as documented
    tc, name = resolve(load_config(p, overrides=['train.recipe="none"']), rollout)
    assert name == "none" and tc.d_sae == 65536
    # a small cache gets the recipe's warmup and dead threshold fitted to it, never the typed ones
    tc, _ = resolve(load_config(p), rollout)
    fitted, notes = fit_to_run(tc, [], 40_960)
    assert fitted.warmup_steps == 2 and fitted.dead_tokens == 10_240 and len(notes) == 2
    # the cards' own runs are left as they are: the 001 card's 5000 warmup steps of 48,829
    corpus, _ = resolve(load_config(), {"source": {"name": "corpus"}})
    assert fit_to_run(corpus, [], 200_000_000)[0] == corpus
    assert fit_to_run(tc, ["warmup_steps", "dead_tokens"], 40_960)[0] == tc
    for bad, msg in [
        ("[recipes.rollouts]\nout = 'x'", "not a recipe key"),
        ("[recipes.rollouts]\nk = 'x'", "integer"),
        ("[recipes.other]\nk = 2", "unknown key 'other'"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            load_config(write(tmp_path / "bad", bad))
    with pytest.raises(UserError, match="train.recipe 'big' is unknown"):
        resolve(load_config(p, overrides=['train.recipe="big"']), rollout)
