"""The generic machinery of `pipeline.toml`: TOML, profiles, `--set`, unknown keys, types,
field docs, and the effective configuration printed back as TOML.

Each stage owns the schema of its sections (`harvest.config`, `train.config`) with its checks
in `__post_init__`; keys that both stages read are declared here, at the end (`HarvestKeys`,
`TrainKeys`, `AnalysisKeys`), where both may import them. Each field is written
`name: T = setting(default, "one-line doc")`: the default once, in the schema, and the doc
where `render_toml` (the stages' `config` commands) and `--help` find it. A stage
loads the file through `load_sections` with its own schema: a dataclass whose fields are the
sections it reads. Sections that another stage owns are named in the schema's `OTHER_SECTIONS`
and left for that stage to check; a section the schema shares (`shared_section`) is checked for
the keys it declares and leaves the others to their owner.
Precedence is toml < `[profile.NAME]` < CLI flags / `--set section.key=value`.
Unknown sections and keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from .errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """pipeline.toml (or a --set override) is malformed or names an unknown key."""


class OutOfRange(ConfigError):
    """A value a run could not use; `load_sections` rewrites the hint to name where it came from."""

    def __init__(self, key: str, value: Any, bound: str, fix: str | None = None):
        self.key, self.value, self.bound = key, value, bound
        fix = fix or f"fix it in pipeline.toml or with --set {key}=VALUE"
        super().__init__(f"{key} = {value} must be {bound}; {fix}")


def check_ranges(section: Any, name: str, ranges: typing.Iterable[tuple[str, float, bool]]) -> None:
    """For `__post_init__`: refuse values a run could not use, before any work, in one line.

    `ranges` holds (key, lowest allowed value, whether the bound itself is allowed)."""
    for key, low, inclusive in ranges:
        v = getattr(section, key)
        if v < low or (v == low and not inclusive):
            raise OutOfRange(f"{name}.{key}", v, f"at least {low}" if inclusive else f"above {low}")


def setting(default: Any = MISSING, doc: str = "", *, factory: Callable[[], Any] | None = None) -> Any:
    """A schema field with its one-line doc: `layers: list[int] = setting([11, 31, 55], "...")`.

    A list, dict or dataclass default is copied for each instance (no shared mutable default);
    `factory` builds the default instead where it needs code."""
    metadata = {"doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def shared_section(factory: Any, doc: str = "") -> Any:
    """A schema field for a section another stage owns, of which this stage reads some keys."""
    return field(default_factory=factory, metadata={"shared": True, "doc": doc})


def doc_of(schema: type, key: str) -> str:
    """The doc of a (dotted) key of `schema`: `doc_of(PipelineConfig, "harvest.layers")`, for `--help`
    texts and the `config` commands. A section's doc is its class docstring's first line."""
    cls, parts = schema, key.split(".")
    for i, part in enumerate(parts):
        f = {f.name: f for f in dataclasses.fields(cls)}.get(part)
        if f is None:
            raise KeyError(f"{schema.__name__} has no key {'.'.join(parts[: i + 1])!r}")
        tp = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            return f.metadata.get("doc") or (_first_line(tp) if dataclasses.is_dataclass(tp) else "")
        cls = tp
    return ""  # pragma: no cover


def _first_line(cls: type) -> str:
    return ((cls.__doc__ or "").strip().splitlines() or [""])[0]


@dataclass
class Loaded:
    """What every stage's schema records besides its sections (for provenance and recipes)."""

    profile: str = ""  # the profile applied
    source_path: str = ""  # the toml file read
    keys_set: dict[str, list[str]] = field(default_factory=dict)  # section -> keys the toml, profile or flags set


# ---------------------------------------------------------------------------------------
# loading


def find_config(path: str | Path | None = None) -> Path:
    """`--config` if given, else ./pipeline.toml, else the one shipped with the packages."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist: pass --config PATH to a pipeline.toml")
        return p
    local = Path("pipeline.toml")
    if local.is_file():
        return local
    return shipped_config()


def shipped_config() -> Path:
    """The package's pipeline.toml (a wheel: package data), else the checkout's (editable installs)."""
    candidates = [
        Path(str(resources.files("cache_format") / "pipeline.toml")),
        Path(__file__).resolve().parents[1] / "pipeline.toml",
    ]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(
        f"no pipeline.toml here and none shipped (looked in {', '.join(map(str, candidates))}); pass --config PATH"
    )


def load_sections(
    schema: type[T],
    path: str | Path | None = None,
    profile: str | None = None,
    overrides: typing.Iterable[str] = (),
    **flags: Any,
) -> T:
    """Read pipeline.toml, apply a profile, then `--set` overrides and CLI flags, into `schema`.

    `flags` are dotted keys from CLI options (`{"harvest.layers": [1, 3]}`); None values
    are ignored so that an absent flag never overrides the file.
    """
    p = find_config(path)
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: malformed TOML ({e}); fix the file's syntax") from None
    profiles = raw.pop("profile", {})
    if not isinstance(profiles, dict):
        raise ConfigError(f"{p}: [profile] must be a table of [profile.NAME] tables")
    origin = _Origins(p, profile)
    origin.mark(raw, "file")
    if profile:
        if profile not in profiles:
            known = ", ".join(sorted(profiles)) or "none"
            raise ConfigError(f"{p}: unknown profile {profile!r} (known: {known})")
        raw = _deep_merge(raw, profiles[profile])
        origin.mark(profiles[profile], "profile")
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
        origin.mark_dotted(key, "--set")
    for key, value in flags.items():
        if value is not None:
            _set_dotted(raw, key, value)
            origin.mark_dotted(key, "flag")
    sections = {f.name: f for f in dataclasses.fields(schema) if f.name not in _LOADED}
    other = tuple(getattr(schema, "OTHER_SECTIONS", ()))
    known = ", ".join(sorted([*sections, *other]))
    kwargs = {}
    for name, table in raw.items():
        if name in other:
            continue  # another stage's section: that stage checks it
        if name not in sections:
            raise ConfigError(f"{origin.section(name)}: unknown key {name!r} (known: {known})")
        cls = typing.get_type_hints(schema)[name]
        kwargs[name] = build_section(
            cls,
            table,
            origin.section(name),
            fix=origin.fix,
            partial=sections[name].metadata.get("shared", False),
            label=lambda key, name=name: origin.key(name, key),
        )
    cfg = schema(**kwargs)
    cfg.profile = profile or ""
    cfg.source_path = str(p)
    cfg.keys_set = {k: sorted(v) for k, v in raw.items() if isinstance(v, dict)}
    return cfg


class _Origins:
    """Where each `section.key` came from (the file, its profile, `--set` or a command-line
    option), so that a message names the place the user has to fix."""

    COMMAND_LINE = ("--set", "flag")

    def __init__(self, path: Path, profile: str | None):
        self.path, self.profile = path, profile
        self.of: dict[tuple[str, str], str] = {}  # (section, key) -> "file" | "profile" | "--set" | "flag"

    def mark(self, tables: dict, how: str) -> None:
        for name, table in tables.items():
            for key in table if isinstance(table, dict) else ("",):
                self.of[(name, key)] = how

    def mark_dotted(self, dotted: str, how: str) -> None:
        name, _, rest = dotted.partition(".")
        self.of[(name, rest.split(".")[0])] = how

    def key(self, name: str, key: str) -> str:
        """The label of one key's value in a message."""
        how = self.of.get((name, key))
        if how == "--set":
            return f"--set {name}.{key}"
        if how == "flag":
            return f"the command-line option setting {name}.{key}"
        if how == "profile":
            return f"{self.path} [profile.{self.profile}.{name}].{key}"
        return f"{self.path} [{name}].{key}"

    def section(self, name: str) -> str:
        """A whole section's label: its `--set` (or option) when only the command line wrote it."""
        keys = {k: how for (n, k), how in self.of.items() if n == name}
        if keys and all(how in self.COMMAND_LINE for how in keys.values()):
            return self.key(name, next(iter(keys)))
        return f"{self.path} [{name}]"

    def fix(self, dotted: str) -> str:
        """The hint of a value out of range (`OutOfRange`), by where `dotted` came from."""
        name, _, key = dotted.partition(".")
        how = self.of.get((name, key))
        if how == "--set":
            return f"it came from --set: give --set {dotted}=VALUE a value in range"
        if how == "flag":
            return f"it came from the command-line option setting {dotted}: give it a value in range"
        if how == "profile":
            return f"fix it in [profile.{self.profile}] of {self.path} or with --set {dotted}=VALUE"
        return f"fix it in {self.path} or with --set {dotted}=VALUE"


_LOADED = {f.name for f in dataclasses.fields(Loaded)}


def build_section(
    cls: type,
    raw: dict,
    where: str,
    fix: Callable[[str], str] | None = None,
    partial: bool = False,
    label: Callable[[str], str] | None = None,
) -> Any:
    """A section's dataclass from a plain table, with the same checks as pipeline.toml's.

    `fix(key)` replaces the hint of a value out of range; `label(key)` names where a key's
    value came from in messages (default `where.key`); `partial` keeps keys the class does not
    declare out of it without an error (their owner checks them)."""
    try:
        return _build(cls, raw, where, partial, label)
    except OutOfRange as e:
        if fix is None:
            raise
        raise OutOfRange(e.key, e.value, e.bound, fix(e.key)) from None


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=VALUE (VALUE a TOML literal)")
    key, text = item.split("=", 1)
    key = key.strip()
    if "." not in key:
        raise ConfigError(f"--set {item!r}: the key must name its section, e.g. train.k=32")
    try:
        return key, tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return key, _BareString(text)  # typed below: accepted only where a string is expected


class _BareString(str):
    """An unquoted --set value; valid only for string-typed keys."""


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = value


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _build(cls: type, raw: Any, where: str, partial: bool = False, label: Callable[[str], str] | None = None) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, got {raw!r}")
    label = label or (lambda key: f"{where}.{key}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            if partial:
                continue
            known = ", ".join(sorted(names))
            raise ConfigError(f"{label(key)}: unknown key {key!r} (known: {known})")
        kwargs[key] = coerce(hints[key], value, label(key))
    required = [f.name for f in fields if f.default is MISSING and f.default_factory is MISSING and f.init]
    missing = [k for k in required if k not in kwargs]
    if missing:
        raise ConfigError(f"{where}: missing key {missing[0]!r} (each entry needs {', '.join(required)})")
    return cls(**kwargs)


def coerce(tp: Any, value: Any, where: str) -> Any:
    """`value` as the type `tp` (a dataclass, list, dict, union or scalar), or one line saying why not."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int)) and item_tp is int:
            value = _int_list(value, where)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return coerce(arg, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if isinstance(value, _BareString) and tp is not str:
        raise ConfigError(f'{where}: {str(value)!r} is not a TOML literal; quote strings, e.g. "text"')
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")


def _int_list(value: str | int, where: str) -> list[int]:
    """`LAYERS=11,31,55` arrives as a string (or one int); accept it for int lists."""
    if isinstance(value, int):
        return [value]
    try:
        return [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{where}: expected comma-separated integers, got {value!r}") from None


# ---------------------------------------------------------------------------------------
# the effective configuration, as TOML


def as_table(section: Any) -> dict:
    """A section (a dataclass instance) as the plain TOML table that would load back into it:
    nested sections as tables, lists of sections as arrays of tables. What `render_toml` prints,
    and what a test compares pipeline.toml's keys with (`as_table(Section())`: the defaults)."""
    return {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section) if f.init}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return as_table(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def render_toml(cfg: Any, sections: Iterable[str] | None = None) -> str:
    """The configuration `cfg` (a stage's loaded schema) as TOML, each key under its doc as a
    comment; loaded back with `--config` it gives the same configuration.

    `sections` picks and orders the sections (default: every section of the schema). A shared
    section (`shared_section`) holds only the keys this stage reads; the comment says so."""
    import tomlkit

    names = [f.name for f in dataclasses.fields(cfg) if f.name not in _LOADED]
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    doc = tomlkit.document()
    origin = f"from {cfg.source_path}" if getattr(cfg, "source_path", "") else "from the schema defaults"
    profile = f", profile {cfg.profile}" if getattr(cfg, "profile", "") else ""
    doc.add(tomlkit.comment(f"the effective configuration ({origin}{profile}, then --set and options)"))
    for name in sections if sections is not None else names:
        section = getattr(cfg, name)
        doc.add(tomlkit.nl())
        doc.add(tomlkit.comment(fields[name].metadata.get("doc") or _first_line(type(section))))
        if fields[name].metadata.get("shared"):
            doc.add(tomlkit.comment("(only the keys this stage reads; the stage that owns the section has the rest)"))
        doc.add(name, _table(section) if dataclasses.is_dataclass(section) else tomlkit.item(_plain(section)))
    return tomlkit.dumps(doc)


def _table(section: Any):
    """One section as a tomlkit table, scalars first (TOML puts sub-tables after them)."""
    import tomlkit

    table = tomlkit.table()
    later = []
    for f in dataclasses.fields(section):
        if not f.init:
            continue
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value) or (
            isinstance(value, list) and value and dataclasses.is_dataclass(value[0])
        ):
            later.append((f, value))
            continue
        if f.metadata.get("doc"):
            table.add(tomlkit.comment(f.metadata["doc"]))
        table.add(f.name, tomlkit.item(_plain(value)))
    for f, value in later:
        if f.metadata.get("doc"):
            table.add(tomlkit.comment(f.metadata["doc"]))
        if isinstance(value, list):
            aot = tomlkit.aot()
            for item in value:
                aot.append(_table(item))
            table.add(f.name, aot)
        else:
            table.add(f.name, _table(value))
    return table


# ---------------------------------------------------------------------------------------
# keys that more than one stage reads
#
# Each is the part of another stage's section that a stage needs: train reads where harvest
# wrote (`[harvest].cache`); harvest's splice finds a run's SAEs, its held-out split and its
# loss settings (`[train]`, `[analysis]`). The owning stage's section extends these classes,
# so a key is declared once and has one default.


@dataclass
class HarvestKeys:
    """`[harvest]` keys train reads."""

    cache: str = setting(
        "caches/qwen36-27b", "where harvest writes, and train reads unless [train].cache says otherwise"
    )


@dataclass
class TrainKeys:
    """`[train]` keys harvest's splice reads (to find the SAEs and their held-out split)."""

    cache: str = setting("", 'the cache train reads; "" = [harvest].cache')
    out: str = setting("runs/qwen36-27b", "the run directory: checkpoints, exported SAEs, trajectories")
    heldout_fraction: float = setting(0.01, "share of the sequences held out for validation (by sequence, never token)")
    split_seed: int = setting(0, "seed of the held-out split's hash of the sequence ids")

    def __post_init__(self):
        check_ranges(self, "train", [("heldout_fraction", 0, True)])
        if self.heldout_fraction >= 1:
            raise OutOfRange(
                "train.heldout_fraction", self.heldout_fraction, "below 1 (a share of the sequences, e.g. 0.01)"
            )


@dataclass
class AnalysisKeys:
    """`[analysis]` keys harvest's splice reads (loss recovered runs the base model)."""

    loss_sequences: int = setting(64, "held-out sequences for loss recovered")
    loss_batch_size: int = setting(4, "sequences per forward pass of loss recovered")
