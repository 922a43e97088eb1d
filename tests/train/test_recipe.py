"""Recipes follow the cache: which one is chosen, how it layers under [train], and how a small
cache's run is fitted."""

import textwrap

import pytest

from cache_format.config import ConfigError
from cache_format.errors import UserError
from train.config import load_config


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
