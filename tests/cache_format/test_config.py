"""cache_format.config, the generic machinery: precedence, profiles, typed --set overrides and
one-line errors (exercised through the stages' schemas, which are what users load)."""

import textwrap

import pytest

from cache_format.config import ConfigError, OutOfRange, build_section
from harvest.config import HarvestConfig
from harvest.config import load_config as load_harvest
from train.config import TrainConfig
from train.config import load_config as load_config  # the schema with the most sections of its own


def write(tmp_path, text):
    p = tmp_path / "pipeline.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_precedence_file_then_profile_then_set_then_flags(tmp_path):
    p = write(
        tmp_path,
        """
        [train]
        k = 8
        d_sae = 64
        [profile.small.train]
        k = 4
        """,
    )
    assert load_config(p).train.k == 8
    assert load_config(p, profile="small").train.k == 4
    cfg = load_config(p, profile="small", overrides=["train.k=2"])
    assert cfg.train.k == 2 and cfg.train.d_sae == 64
    cfg = load_config(p, profile="small", overrides=["train.k=2"], **{"train.k": 1, "train.lr": None})
    assert cfg.train.k == 1 and cfg.train.lr == 2e-4


def test_set_takes_toml_literals_and_bare_strings_only_for_strings(tmp_path):
    p = write(tmp_path, "")
    sets = ["harvest.layers=[1, 2]", "harvest.cache=runs/x", "train.lr=1e-3"]
    cfg, tcfg = load_harvest(p, overrides=sets), load_config(p, overrides=sets)
    assert cfg.harvest.layers == [1, 2] and cfg.harvest.cache == "runs/x" and tcfg.train.lr == 1e-3
    assert tcfg.harvest.cache == "runs/x"  # the key train shares with harvest
    with pytest.raises(ConfigError, match="not a TOML literal"):
        load_config(p, overrides=["train.k=abc"])
    with pytest.raises(ConfigError, match="section"):
        load_config(p, overrides=["k=3"])


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
    # each stage refuses what is wrong in its own sections (corpus is harvest's, train train's)
    load = load_harvest if "corpus" in text else load_config
    with pytest.raises(ConfigError, match=message) as e:
        load(write(tmp_path, text))
    assert "\n" not in str(e.value)


def test_unknown_profile_and_missing_file(tmp_path):
    p = write(tmp_path, "[profile.a.train]\nk = 1\n")
    with pytest.raises(ConfigError, match="unknown profile 'b'.*known: a"):
        load_config(p, profile="b")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_each_stage_checks_its_own_sections_and_leaves_the_others_to_their_owner(tmp_path):
    p = write(tmp_path, "[train]\nkk = 1\nheldout_fraction = 0.5\n[corpus]\nseq_len = 'x'\n")
    # harvest reads [train]'s shared keys (checked) and leaves the rest to train, which refuses kk
    assert load_harvest(p, overrides=["corpus.seq_len=64"]).train.heldout_fraction == 0.5
    with pytest.raises(ConfigError, match="unknown key 'kk'"):
        load_config(p)
    # train leaves [corpus] to harvest, which refuses its type
    assert load_config(write(tmp_path, "[corpus]\nseq_len = 'x'\n")).train.k == 128
    with pytest.raises(ConfigError, match="expected an integer"):
        load_harvest(p)
    # a shared key is checked by every stage that reads it
    for load in (load_harvest, load_config):
        with pytest.raises(ConfigError, match="heldout_fraction = 1.5 must be below 1"):
            load(write(tmp_path, "[train]\nheldout_fraction = 1.5\n"))


def test_checks_sit_in_the_sections_so_code_gets_them_too(tmp_path):
    with pytest.raises(OutOfRange, match=r"train\.lr = -1 must be at least 0; fix it in pipeline.toml"):
        TrainConfig(lr=-1)
    with pytest.raises(OutOfRange, match=r"harvest\.batch_size = 0 must be at least 1"):
        HarvestConfig(batch_size=0)
    with pytest.raises(OutOfRange, match=r"train\.k = 0 must be at least 1; fix \[recipes\.corpus\]$"):
        build_section(TrainConfig, {"k": 0}, "train", fix=lambda key: "fix [recipes.corpus]")
    with pytest.raises(OutOfRange, match=rf"fix it in {tmp_path}/pipeline.toml or with --set train.k=VALUE"):
        load_config(write(tmp_path, "[train]\nk = 0\n"))


def test_a_message_names_where_the_value_came_from(tmp_path):
    """The file, its profile, --set or a command-line option: the place the user has to fix."""
    p = write(tmp_path, "[train]\nk = 0\n[profile.p.train]\nlr = -1\n[profile.q.harvest]\nbatch_size = 0\n")
    with pytest.raises(OutOfRange, match=rf"train.k = 0 must be at least 1; fix it in {p} or with --set train.k="):
        load_config(p)
    with pytest.raises(OutOfRange, match=r"train.lr = -1.0 must be at least 0; fix it in \[profile.p\] of "):
        load_config(p, profile="p", overrides=["train.k=4"])
    with pytest.raises(OutOfRange, match=r"train.k = -3 must be at least 1; it came from --set: give --set train.k="):
        load_config(p, overrides=["train.k=-3"])
    with pytest.raises(OutOfRange, match=r"corpus.tokens = 0 must be at least 1; it came from the command-line option"):
        load_harvest(p, **{"corpus.tokens": 0})
    with pytest.raises(OutOfRange, match=r"harvest.batch_size = 0 .*fix it in \[profile.q\]"):
        load_harvest(p, profile="q")
    with pytest.raises(ConfigError, match=r"^--set train.d_sae: expected an integer, got 'x'"):
        load_config(p, overrides=["train.k=4", "train.d_sae='x'"])
    (tmp_path / "other").mkdir()
    other = write(tmp_path / "other", "[train]\nkk = 1\n")
    with pytest.raises(ConfigError, match=rf"^{other} \[train\].kk: unknown key 'kk'"):
        load_config(other)
    with pytest.raises(ConfigError, match=r"^--set train.kk: unknown key 'kk'"):
        load_config(p, overrides=["train.kk=1"])
    with pytest.raises(ConfigError, match=r"^--set trian.k: unknown key 'trian'"):
        load_config(p, overrides=["train.k=4", "trian.k=1"])


@pytest.mark.parametrize(
    "sweep, message",
    [
        ("[{d_sae = 64, k = 4}, {k = 4, kk = 1}]", r"\[train\].sweep\[1\].kk: unknown key 'kk'"),
        ("[{d_sae = 64, k = 64}]", r"train.sweep\[0\].k=64 must be between 1 and d_sae-1 \(d_sae=64\)"),
        ("[{matryoshka_sizes = [8]}]", r"train.sweep\[0\]: matryoshka_sizes is not read by architecture 'topk'"),
    ],
)
def test_a_bad_sweep_entry_is_named(tmp_path, sweep, message):
    """A sweep entry takes what it leaves out from [train]; what it gets wrong names the entry."""
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, f"[train]\nsweep = {sweep}\n")).train.saes()


def test_without_a_local_file_the_one_shipped_pipeline_toml_is_read(tmp_path, monkeypatch):
    from pathlib import Path

    from cache_format.config import find_config

    monkeypatch.chdir(tmp_path)
    shipped = find_config()
    assert shipped == Path(__file__).resolve().parents[2] / "pipeline.toml" and not shipped.is_symlink()
    assert load_config().train.d_sae == 65536 and load_harvest().harvest.layers == [11, 31, 55]


@pytest.mark.slow
def test_a_wheel_carries_the_one_pipeline_toml_as_package_data(tmp_path):
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    had_build_dir = (root / "build").exists()
    build = ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    try:
        subprocess.run([sys.executable, "-m", "pip", *build, str(root)], check=True, capture_output=True, cwd=tmp_path)
    finally:
        if not had_build_dir:  # setuptools builds in the source tree
            shutil.rmtree(root / "build", ignore_errors=True)
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read("cache_format/pipeline.toml") == (root / "pipeline.toml").read_bytes()


def test_a_setting_carries_its_default_once_and_its_doc(tmp_path):
    import dataclasses

    from cache_format.config import doc_of, setting

    @dataclasses.dataclass
    class Section:
        """A section for the test.

        More words."""

        layers: list[int] = setting([1, 2], "which layers")
        name: str = setting("x", "what it is called")
        plain: int = 3

    a, b = Section(), Section()
    a.layers.append(9)
    assert b.layers == [1, 2]  # a mutable default is copied, never shared
    assert doc_of(Section, "layers") == "which layers" and doc_of(Section, "plain") == ""
    from harvest.config import PipelineConfig

    assert "where harvest writes" in doc_of(PipelineConfig, "harvest.cache")
    assert doc_of(PipelineConfig, "harvest") == "How activations are captured and laid out in the cache."
    with pytest.raises(KeyError, match="harvest.nope"):
        doc_of(PipelineConfig, "harvest.nope")


def test_render_toml_prints_the_effective_config_with_docs_and_loads_back(tmp_path):
    from cache_format.config import render_toml

    for load in (load_harvest, load_config):
        cfg = load(profile="tiny", overrides=["train.split_seed=7"])
        text = render_toml(cfg)
        assert "# seed of the held-out split's hash of the sequence ids\nsplit_seed = 7\n" in text
        p = tmp_path / "effective.toml"
        p.write_text(text)
        again = load(p)
        assert again.keys_set  # it was read from the printed file
        for f in ("model", "harvest", "supergpqa", "corpus", "train", "analysis", "recipes"):
            if hasattr(cfg, f):
                assert getattr(again, f) == getattr(cfg, f), f
    text = render_toml(load_harvest(profile="tiny"), ["harvest", "corpus"])
    assert "[harvest]" in text and "[[corpus.sources]]" in text and "[model]" not in text


def test_as_table_is_the_table_that_loads_back_into_the_section():
    """What a test of pipeline.toml against the schema defaults compares with (`as_table(Section())`)."""
    from cache_format.config import as_table
    from harvest.config import CorpusConfig, SuperGPQAConfig

    for section, name in ((CorpusConfig(), "corpus"), (SuperGPQAConfig(), "supergpqa"), (TrainConfig(), "train")):
        table = as_table(section)
        assert all(not hasattr(v, "__dataclass_fields__") for v in table.values())  # plain TOML values only
        assert build_section(type(section), table, name) == section
    sources = as_table(CorpusConfig())["sources"]
    assert isinstance(sources, list) and sources[0]["name"] == CorpusConfig().sources[0].name
