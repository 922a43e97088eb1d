"""Each default is written once, in a stage's schema: every key `pipeline.toml` sets outside
`[profile.*]` must equal the schema's default, so the file documents the defaults and the two
cannot drift (they did: `harvest.mix_window` was 0 in the schema and 256 in the file).

A stage adds its sections to `STAGES` with its loader and the schema's default instance.
"""

import dataclasses
import tomllib

import pytest

import harvest.config
import train.config
from cache_format.config import shipped_config

# (stage, its load_config, its schema's defaults, the sections it owns in pipeline.toml)
HARVEST_SECTIONS = ("model", "harvest", "supergpqa", "corpus")
TRAIN_SECTIONS = ("train", "recipes", "analysis")
STAGES = [
    ("harvest", harvest.config.load_config, harvest.config.PipelineConfig(), HARVEST_SECTIONS),
    ("train", train.config.load_config, train.config.PipelineConfig(), TRAIN_SECTIONS),
]


def differences(raw: dict, loaded, default, where: str) -> list[str]:
    """Keys of the toml table `raw` whose loaded value is not the schema's default."""
    out = []
    for key, value in raw.items():
        got, want = getattr(loaded, key), getattr(default, key)
        if isinstance(value, dict) and dataclasses.is_dataclass(want):
            out += differences(value, got, want, f"{where}.{key}")
        elif got != want:
            out.append(f"[{where}].{key}: pipeline.toml sets {got!r}, the schema's default is {want!r}")
    return out


@pytest.mark.parametrize("stage, load, default, sections", STAGES, ids=[s[0] for s in STAGES])
def test_pipeline_toml_sets_only_schema_defaults(stage, load, default, sections):
    raw = tomllib.loads(shipped_config().read_text())
    raw.pop("profile")
    loaded = load(shipped_config())
    found = [d for s in sections for d in differences(raw[s], getattr(loaded, s), getattr(default, s), s)]
    assert not found, "\n".join(found)


def test_the_check_sees_a_drifted_default(tmp_path):
    p = tmp_path / "pipeline.toml"
    p.write_text(shipped_config().read_text().replace("mix_window = 256", "mix_window = 64"))
    raw = tomllib.loads(p.read_text())
    got = differences(raw["harvest"], harvest.config.load_config(p).harvest, harvest.config.HarvestConfig(), "harvest")
    assert got == ["[harvest].mix_window: pipeline.toml sets 64, the schema's default is 256"]


def undocumented(schema: type, where: str) -> list[str]:
    """Keys of a stage's schema (nested sections included) without the one-line doc `config` prints."""
    from cache_format.config import doc_of

    out = []
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += undocumented(type(default), f"{where}.{f.name}")
        elif not doc_of(schema, f.name):
            out.append(f"{where}.{f.name}")
    return out


@pytest.mark.parametrize("stage, load, default, sections", STAGES, ids=[s[0] for s in STAGES])
def test_every_key_of_a_stage_has_its_doc(stage, load, default, sections):
    missing = [k for s in sections for k in undocumented(type(getattr(default, s)), s)]
    assert not missing, f"keys `python -m {stage} config` would print without a doc: {missing}"
