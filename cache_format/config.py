"""The generic machinery of `pipeline.toml`: TOML, profiles, `--set`, unknown keys, types.

Each stage owns the schema of its sections (`harvest.config`, `train.config`) with its checks
in `__post_init__`; keys that both stages read live in `cache_format.shared_keys`. A stage
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
from collections.abc import Callable
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


def shared_section(factory: Any) -> Any:
    """A schema field for a section another stage owns, of which this stage reads some keys."""
    return field(default_factory=factory, metadata={"shared": True})


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


def config_options(f=None, *, layers: bool = True, cache_help: str = "Cache location (path or fsspec URL)."):
    """The flags every stage's commands take: --config, --profile, --cache, [--layers,] --set.

    Use bare (`@config_options`) or configured (`@config_options(layers=False, cache_help=...)`).
    """
    import click

    def wrap(f):
        f = click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="SECTION.KEY=VALUE",
            help="Override any pipeline.toml key with a TOML literal.",
        )(f)
        if layers:
            f = click.option(
                "--layers",
                default=None,
                metavar="N,N,...",
                help="Comma-separated layer numbers, as the model counts them.",
            )(f)
        f = click.option("--cache", default=None, metavar="URL", help=cache_help)(f)
        f = click.option("--profile", default=None, help="Apply [profile.NAME] from pipeline.toml (e.g. tiny).")(f)
        f = click.option(
            "--config",
            "config_path",
            default=None,
            metavar="PATH",
            help="pipeline.toml to read (default: ./pipeline.toml, else the packaged copy).",
        )(f)
        return f

    return wrap(f) if f is not None else wrap


def parse_layers(text: str | None) -> list[int] | None:
    """`--layers 11,31,55` → [11, 31, 55]; None stays None (the config decides)."""
    if text is None or text == "":
        return None
    try:
        layers = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--layers {text!r}: expected comma-separated integers like 11,31,55") from None
    if not layers or any(x < 0 for x in layers):
        raise ConfigError(f"--layers {text!r}: layers are non-negative integers like 11,31,55")
    return layers
