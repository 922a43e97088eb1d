"""harvest.config: harvest's sections as shipped, what its loader accepts, and defaults written
once (in the schema: a toml that leaves a key out gets what pipeline.toml documents)."""

import subprocess
import sys
import textwrap
import tomllib

from cache_format.config import shipped_config
from harvest.config import load_config


def harvest_config(*args: str) -> str:
    """What `python -m harvest config ARGS` prints (stdout), in a subprocess as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "harvest", "config", *args], capture_output=True, text=True, check=True
    ).stdout


def section_of(text: str, line: str) -> str:
    """The [section] header above `line` in a TOML text (`line` must be in it)."""
    lines = text.splitlines()
    at = lines.index(line)
    return next(x for x in reversed(lines[:at]) if x.startswith("["))


def without_mix_window(tmp_path):
    """A copy of the shipped pipeline.toml with its mix_window line removed."""
    lines = shipped_config().read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith("mix_window")]
    assert len(kept) == len(lines) - 1
    p = tmp_path / "pipeline.toml"
    p.write_text("".join(kept))
    return p


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

    p = without_mix_window(tmp_path)
    flags = {"harvest.cache": str(tmp_path / "c"), "harvest.source": "corpus", "harvest.layers": [0]}
    flags["corpus.tokens"] = 256
    cfg = load_config(p, "tiny", ["corpus.seq_len=32", "harvest.segment_sequences=8"], **flags)
    assert cfg.harvest.mix_window == 256 and "mix_window" not in cfg.keys_set["harvest"]
    run(cfg, progress=False)
    c = cf.open_cache(str(tmp_path / "c"))
    assert c.meta["harvest"]["mix_window"] == 256
    assert [s.meta["mix"]["window"] for s in c.segments] == [256]


def test_config_command_prints_mix_window_256_under_harvest_with_its_doc(tmp_path):
    for args in (["--profile", "tiny"], ["--config", str(without_mix_window(tmp_path)), "--profile", "tiny"]):
        text = harvest_config(*args)
        assert section_of(text, "mix_window = 256") == "[harvest]", args
        doc = "# sequences permuted together at write time (the loader needs it to mix); 0 = in order"
        assert f"{doc}\nmix_window = 256\n" in text
        assert tomllib.loads(text)["harvest"]["mix_window"] == 256


def test_config_command_prints_what_run_would_use_and_loads_back(tmp_path):
    """`config` takes run's flags; what it prints, read with --config, is the same configuration."""
    args = ["--profile", "tiny", "--set", "harvest.mix_seed=3", "--tokens", "999", "--source", "corpus"]
    args += ["--layers", "0,2", "--cache", str(tmp_path / "c")]
    text = harvest_config(*args)
    printed = tomllib.loads(text)
    assert printed["harvest"]["mix_seed"] == 3 and printed["corpus"]["tokens"] == 999
    assert printed["harvest"]["source"] == "corpus" and printed["harvest"]["layers"] == [0, 2]
    assert set(printed) == {"model", "harvest", "supergpqa", "corpus", "train", "analysis"}
    p = tmp_path / "effective.toml"
    p.write_text(text)
    again = load_config(p)
    want = load_config(
        None,
        "tiny",
        ["harvest.mix_seed=3"],
        **{
            "corpus.tokens": 999,
            "harvest.source": "corpus",
            "harvest.layers": [0, 2],
            "harvest.cache": str(tmp_path / "c"),
        },
    )
    for section in printed:
        assert getattr(again, section) == getattr(want, section), section
