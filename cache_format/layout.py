"""The on-disk layout in one place: where each object of a cache lives, and what its bytes and
codes mean.

Writers, readers, gc, leases, sync and backfill all build object keys here, so a path is
spelled once; the row columns' dtypes, the role/label codes, the residuals' bfloat16 bit
patterns and the sequences table are the format's contract with every reader (train
included), so they live beside the paths.

The same layout bounds what a cache may name: `check_record` and `check_root` refuse a commit
record or root attributes whose keys leave it (a segment's parts under `segments/<sid>/`,
tokenizer files as plain names under `tokenizer/`), so a crafted cache, even one re-sealed
with a valid hash chain, cannot point a reader, `verify`, `sync` or `gc` outside its root.
"""

from __future__ import annotations

import re
import sys

import ml_dtypes
import numpy as np

from .errors import UserError

ROW_COLUMNS = {"tokens": "int32", "seq_ids": "int64", "positions": "int32", "labels": "int8", "roles": "int8"}
TOKENIZER_DIR = "tokenizer"
SEGMENTS = "segments"
BACKFILL_PREFIX = "backfill-"
# the keys a manifest entry names its checksum by (log.DIGESTS); the last is formats 1-2's
OBJECT_DIGESTS = ("blake3", "blake2b")

ROLE_TEXT, ROLE_PROMPT, ROLE_THINKING, ROLE_ANSWER = 0, 1, 2, 3
LABEL_CORRECT, LABEL_WRONG, LABEL_NONE = 1, 0, -1
ROLE_CODES = {"text": ROLE_TEXT, "prompt": ROLE_PROMPT, "thinking": ROLE_THINKING, "answer": ROLE_ANSWER}
ROLE_NAMES = {code: name for name, code in ROLE_CODES.items()}


def role_codes(roles) -> tuple[int, ...]:
    """Role names or codes (["thinking", 3]) as sorted, distinct codes; a one-line error for any other."""
    out = set()
    for r in roles:
        if isinstance(r, str) and r in ROLE_CODES:
            out.add(ROLE_CODES[r])
        elif isinstance(r, (int, np.integer)) and not isinstance(r, bool) and int(r) in ROLE_NAMES:
            out.add(int(r))
        else:
            raise UserError(f"role {r!r} is unknown; use text, prompt, thinking or answer")
    return tuple(sorted(out))


class LayoutError(ValueError):
    """A record or the root attributes name a key outside the layout (or are not shaped as the format says)."""


_PLAIN = re.compile(r"[A-Za-z0-9_.-]+")


def name_problem(name) -> str | None:
    """Why `name` is not a plain name (one path part of letters, digits, '.', '_' and '-'; not '.' or '..')."""
    if not isinstance(name, str) or not _PLAIN.fullmatch(name) or name in (".", ".."):
        return "it is not a plain name (letters, digits, '.', '_', '-')"
    return None


def _name(value, what: str) -> str:
    why = name_problem(value)
    if why:
        raise LayoutError(f"{what} {value!r}: {why}")
    return value


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*")


def _key(value, what: str, base: str | None = None) -> str:
    """A relative key of plain parts (under `base/` if given)."""
    if not (isinstance(value, str) and _PLAIN_KEY.fullmatch(value)) or "/./" in f"/{value}/" or "/../" in f"/{value}/":
        from .stores.base import key_problem  # here, not above: the stores import the log, which imports this

        why = key_problem(value) or "its parts are not all plain names (letters, digits, '.', '_', '-')"
        raise LayoutError(f"{what} {value!r}: {why}")
    if base is not None and not value.startswith(f"{base}/"):
        raise LayoutError(f"{what} {value!r} is not under {base}/")
    return value


def _int(value, what: str, least: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise LayoutError(f"{what} {value!r} is not an integer of at least {least}")
    return value


def _dict(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise LayoutError(f"{what} is not a JSON object")
    return value


def _object(entry, what: str) -> None:
    """A manifest entry: {size, <one of OBJECT_DIGESTS>[, chunks]}."""
    _dict(entry, what)
    _int(entry.get("size"), f"{what}.size")
    named = [d for d in OBJECT_DIGESTS if d in entry]
    if len(named) != 1 or not isinstance(entry[named[0]], str):
        raise LayoutError(f"{what} carries no single object digest (one of {', '.join(OBJECT_DIGESTS)})")
    chunks = entry.get("chunks", [])
    if not isinstance(chunks, list) or not all(c is None or isinstance(c, str) for c in chunks):
        raise LayoutError(f"{what}.chunks is not a list of digests")


def _part(part, what: str, where: str, base: str) -> None:
    """A rows group or a layer's array: its path under `base`, and its objects' keys relative to it."""
    _key(_dict(part, what).get(where), f"{what}.{where}", base)
    for k, v in _dict(part.get("objects"), f"{what}.objects").items():
        _object(v, f"{what}.objects[{_key(k, f'{what} object')!r}]")


def _file(entry, what: str, base: str) -> None:
    """A single object named by path: stats, sequences."""
    _object(entry, what)
    _key(entry.get("path"), f"{what}.path", base)


def _layer_entry(entry, what: str, base: str) -> None:
    _part(entry, what, "array", base)
    _file(entry.get("stats"), f"{what}.stats", base)


def check_record(record: dict) -> None:
    """Raise LayoutError if a commit record names a key outside the layout, or is not shaped as its kind says."""
    kind = record.get("kind")
    if kind == "segment":
        base = segment_dir(_name(record.get("segment"), "segment"))
        _int(record.get("n_rows"), "n_rows")
        for L, e in _dict(record.get("layers"), "layers").items():
            if not isinstance(L, str) or not L.isdigit():
                raise LayoutError(f"layer {L!r} is not a layer number")
            _layer_entry(e, f"layers[{L!r}]", base)
        _part(record.get("rows"), "rows", "path", base)
        if record.get("sequences") is not None:
            _file(record["sequences"], "sequences", base)
        if "seq_ranges" in record and not runs_ok(record["seq_ranges"]):
            raise LayoutError("seq_ranges is not a sorted list of [first, end) runs of integers")
    elif kind == "layer":
        _int(record.get("layer"), "layer")
        _layer_entry(record.get("entry"), "entry", segment_dir(_name(record.get("segment"), "segment")))
    elif kind == "add_layer":
        _int(record.get("layer"), "layer")
    elif kind == "retract":
        _name(record.get("segment"), "segment")
    elif kind == "copy":
        _selection(record, "")
    elif kind == "upgrade":
        for base, objs in _dict(record.get("chunks", {}), "chunks").items():
            for k, v in _dict(objs, f"chunks[{_key(base, 'chunks part')!r}]").items():
                _key(k, "chunks object")
                if not isinstance(v, list):
                    raise LayoutError(f"chunks[{base!r}][{k!r}] is not a list of digests")


def _selection(sel: dict, what: str) -> None:
    """A partial copy's selection (`copy` records, the root's `copy_of`): layers, and segment ids or null."""
    layers = sel.get("layers")
    if not isinstance(layers, list):
        raise LayoutError(f"{what}layers is not a list")
    for L in layers:
        _int(L, f"{what}layer")
    segments = sel.get("segments")
    if segments is not None:
        if not isinstance(segments, list):
            raise LayoutError(f"{what}segments is neither null nor a list of segment ids")
        for sid in segments:
            _name(sid, f"{what}segment")


def runs_ok(runs) -> bool:
    """Whether `runs` is a sorted list of disjoint half-open [a, b) integer runs (a record's seq_ranges)."""
    if not isinstance(runs, list):
        return False
    end = None
    for r in runs:
        if not (isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r) and r[0] < r[1]):
            return False
        if end is not None and r[0] < end:
            return False
        end = r[1]
    return True


def check_root(attrs: dict) -> None:
    """Raise LayoutError if the root attributes name a key outside the layout (hook, tokenizer file
    names) or lack the sizes every reader computes with."""
    _name(attrs.get("hook"), "hook")
    for k in ("d_model", "chunk_tokens", "shard_rows"):
        _int(attrs.get(k), k, least=1)
    layers = attrs.get("layers")
    if not isinstance(layers, list):
        raise LayoutError("layers is not a list")
    for L in layers:
        _int(L, "layer")
    if attrs.get("object_digest", OBJECT_DIGESTS[-1]) not in OBJECT_DIGESTS:
        raise LayoutError(f"object_digest {attrs['object_digest']!r} is not one of {', '.join(OBJECT_DIGESTS)}")
    for name, want in _dict(attrs.get("tokenizer", {}), "tokenizer").items():
        _object(want, f"tokenizer[{_name(name, 'tokenizer file name')!r}]")
    if "copy_of" in attrs:
        _selection(_dict(attrs["copy_of"], "copy_of"), "copy_of.")


def tokenizer_key(name: str) -> str:
    return f"{TOKENIZER_DIR}/{name}"


def segment_dir(segment_id: str) -> str:
    """A segment's directory: the unit its writer leases and gc keeps or removes whole."""
    return f"{SEGMENTS}/{segment_id}"


def backfill_dir(segment_id: str, part: str) -> str:
    """One backfill's directory inside its segment: leased and collected like a segment."""
    return f"{segment_dir(segment_id)}/{BACKFILL_PREFIX}{part}"


def layer_array(base: str, hook: str, layer: int) -> str:
    """The sharded residual array of one layer under a segment or backfill directory."""
    return f"{base}/{hook}/{layer}"


def stats_key(base: str, layer: int) -> str:
    return f"{base}/stats/{layer}.json"


def rows_dir(base: str) -> str:
    return f"{base}/rows"


def sequences_key(base: str) -> str:
    return f"{base}/sequences.parquet"


def unit_of(key: str) -> str | None:
    """The leased unit (segment or backfill directory) an object key belongs to; None outside one."""
    parts = key.split("/")
    if len(parts) < 3:
        return None  # segments/zarr.json
    return "/".join(parts[:3]) if parts[2].startswith(BACKFILL_PREFIX) else "/".join(parts[:2])


def segment_of_unit(unit: str) -> str:
    """The segment directory a unit lies in (itself for a segment)."""
    return "/".join(unit.split("/")[:2])


def sequences_table(records: list[dict]):
    """Per-sequence records as the pyarrow table every reader gets: seq_id int64, token_ids list<int32>."""
    import pyarrow as pa

    if not records:
        return pa.table({"seq_id": pa.array([], pa.int64()), "token_ids": pa.array([], pa.list_(pa.int32()))})
    table = pa.Table.from_pylist(records)
    table = table.set_column(table.schema.get_field_index("seq_id"), "seq_id", table["seq_id"].cast(pa.int64()))
    table = table.set_column(
        table.schema.get_field_index("token_ids"), "token_ids", table["token_ids"].cast(pa.list_(pa.int32()))
    )
    return table


def sequences_bytes(records: list[dict]) -> bytes:
    """The per-sequence table as stored: one zstd-compressed parquet object per segment."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(sequences_table(records), buf, compression="zstd")
    return buf.getvalue().to_pybytes()


# ---------------------------------------------------------------------------------------
# bfloat16 in and out of the cache, bit for bit
#
# The arrays store bf16 as its raw 16-bit pattern (zarr `uint16`, tagged
# `"actcache_dtype": "bfloat16"` in the array attributes), so every zarr reader in every
# language can open them and no value is ever converted on the way in or out.

BF16 = np.dtype(ml_dtypes.bfloat16)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "dtype") and "torch" in sys.modules


def to_bits(x, what: str = "residuals") -> np.ndarray:
    """A bf16 torch tensor or ml_dtypes array → its uint16 bit patterns (no copy where possible)."""
    if _is_torch(x):
        import torch

        if x.dtype != torch.bfloat16:
            raise UserError(f"{what}: expected torch.bfloat16, got {x.dtype}; cast with .to(torch.bfloat16) first")
        return x.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)
    a = np.asarray(x)
    if a.dtype == BF16:
        return np.ascontiguousarray(a).view(np.uint16)
    if a.dtype == np.uint16:
        return np.ascontiguousarray(a)
    raise UserError(
        f"{what}: expected bfloat16 (torch.bfloat16 or ml_dtypes.bfloat16), got {a.dtype}; "
        "convert explicitly so that any rounding is your choice"
    )


def bits_to_numpy(bits: np.ndarray) -> np.ndarray:
    return bits.view(BF16)


def bits_to_torch(bits: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)


def bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Exact widening: a bf16 pattern is the top half of the float32 with the same value."""
    out = np.zeros(bits.shape, np.uint32)
    out.view(np.uint16).reshape(*bits.shape, 2)[..., 1] = bits  # little-endian: high half
    return out.view(np.float32)
