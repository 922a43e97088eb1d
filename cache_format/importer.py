"""`import`: an existing activation dump (safetensors or .npy, like the 000 card's) becomes a cache.

An import is identified by the digest of its files and options (`import.digest` in its
segment's meta), so running the same import again is a no-op that says so, also after a
crash just after its commit; `again` appends a second copy on purpose, numbered after the
cache's last sequence so that no (seq_id, position) is held twice. The segment commits only
if no live segment holds its sequences (`once`, write.py), so two imports racing cannot both land.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np

from . import open_cache
from .errors import CacheError, UserError
from .write import DEFAULT_CHUNK_TOKENS, DEFAULT_CODEC, CacheExistsError, create_cache


def _layer_of(key: str, mapping: dict[str, int]) -> int:
    if key in mapping:
        return mapping[key]
    nums = re.findall(r"\d+", key)
    if not nums:
        raise UserError(f"import: cannot tell the layer of key {key!r}; map it with --map {key}=LAYER")
    return int(nums[-1])


def _check_kind(path: str) -> None:
    if not path.endswith((".safetensors", ".npy")):
        raise UserError(f"import: {path}: expected a .safetensors or .npy file")


def load_dump(paths: list[str], mapping: dict[str, int], layer: int | None = None) -> tuple[dict, str]:
    """Arrays of an activation dump by layer (torch bf16 tensors), and the source dtype."""
    import torch

    arrays: dict[int, object] = {}
    dtypes = set()
    for p in paths:
        if p.endswith(".safetensors"):
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(p, framework="pt") as f:
                    tensors = {k: f.get_tensor(k) for k in f.keys()}
            except (SafetensorError, OSError, ValueError) as e:
                raise UserError(
                    f"import: {p} is not a readable safetensors file ({e}); is it truncated? "
                    "re-export or re-download it"
                ) from None
            for k, t in tensors.items():
                if t.ndim != 2:
                    continue  # not a (tokens, d_model) activation matrix
                L = _layer_of(k, mapping)
                if L in arrays:
                    raise UserError(f"import: two arrays map to layer {L}; use --map KEY=LAYER")
                arrays[L] = t
                dtypes.add(str(t.dtype).removeprefix("torch."))
        elif p.endswith(".npy"):
            try:
                a = np.load(p)
            except (OSError, ValueError, EOFError) as e:
                raise UserError(f"import: {p} is not a readable .npy file ({e}); is it truncated?") from None
            if a.ndim != 2:
                raise UserError(f"import: {p} has shape {a.shape}; expected (tokens, d_model)")
            key = p.rsplit("/", 1)[-1].removesuffix(".npy")
            L = mapping.get(key, layer if layer is not None else _layer_of(key, mapping))
            dtypes.add(str(a.dtype))
            arrays[L] = torch.from_numpy(a.astype(np.float32) if a.dtype not in (np.float16, np.float32) else a)
        else:
            _check_kind(p)
    if not arrays:
        raise UserError("import: no (tokens, d_model) arrays found in the dump")
    return {L: t.to(torch.bfloat16) for L, t in arrays.items()}, ",".join(sorted(dtypes))


def import_dump(
    paths: list[str],
    url: str,
    mapping: dict[str, int],
    layer: int | None = None,
    labels: str | None = None,
    tokens: str | None = None,
    seq_ids: str | None = None,
    seq_len: int = 1024,
    meta: dict | None = None,
    storage_options: dict | None = None,
    codec: str = DEFAULT_CODEC,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    again: bool = False,
) -> dict:
    """Turn a dump into a new cache (or a new segment of an existing one with the same layers).

    Returns what was imported, or `{"already": segment id, ...}` if this very import is in the
    cache already (nothing written; `again=True` appends a second copy)."""
    for p in paths:
        _check_kind(p)
    digest = import_digest(paths, [labels, tokens, seq_ids], mapping, layer, seq_len)
    try:
        w = open_cache(url, mode="a", storage_options=storage_options)
    except CacheError:
        w = None
    if w is not None and not again:
        prior = _imported(w, digest)
        if prior is not None:
            return prior
    arrays, src_dtype = load_dump(paths, mapping, layer)
    ns = {t.shape[0] for t in arrays.values()}
    ds = {t.shape[1] for t in arrays.values()}
    if len(ns) != 1 or len(ds) != 1:
        raise UserError(f"import: arrays disagree on shape ({sorted(ns)} rows, {sorted(ds)} d_model)")
    n, d = ns.pop(), ds.pop()

    def side(path, what, dtype):
        """A per-row .npy (--labels, --tokens, --seq-ids): whole numbers, one per row, never pickles."""
        if path is None:
            return None
        flag = "--" + what.replace("_", "-")
        try:
            a = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise UserError(f"import: {flag} {path} does not exist; check the path") from None
        except (OSError, ValueError, EOFError) as e:
            raise UserError(
                f"import: {flag} {path} is not a readable .npy of numbers ({e}); save a numeric array with np.save"
            ) from None
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "biuf":
            kind = f"dtype {a.dtype}" if isinstance(a, np.ndarray) else "an .npz archive"
            if not isinstance(a, np.ndarray):
                a.close()
            raise UserError(f"import: {flag} {path} holds {kind}, not numbers; save a numeric array with np.save")
        a = a.reshape(-1)
        if len(a) != n:
            raise UserError(f"import: {what} in {path} has {len(a)} values but the activations have {n} rows")
        if a.dtype.kind == "f" and not np.array_equal(a, np.round(a)):
            raise UserError(f"import: {what} in {path} are not whole numbers (dtype {a.dtype}); save integers")
        return a.astype(dtype)

    lab = side(labels, "labels", np.int64)
    if lab is not None and not np.isin(lab, (-1, 0, 1)).all():
        bad = lab[~np.isin(lab, (-1, 0, 1))][0]
        raise UserError(f"import: labels in {labels} hold {bad}; labels are 1 correct, 0 wrong, -1 none")
    tok = side(tokens, "tokens", np.int32)
    sid = side(seq_ids, "seq_ids", np.int64)
    made_up = sid is None
    first = _next_seq_id(w) if made_up and w is not None else 0
    if made_up:  # documented: consecutive blocks of seq_len rows become sequences first, first+1, ...
        sid = first + np.arange(n, dtype=np.int64) // seq_len
    pos = np.zeros(n, np.int32)
    starts = np.r_[0, np.flatnonzero(np.diff(sid)) + 1]
    for a, b in zip(starts, np.r_[starts[1:], n], strict=True):
        pos[a:b] = np.arange(b - a)
    info_meta = {
        "source_files": paths,
        "source_dtype": src_dtype,
        "lossless": src_dtype == "bfloat16",
        "conversion": None
        if src_dtype == "bfloat16"
        else f"{src_dtype} → bfloat16 (round to nearest even): not lossless",
        "made_up_seq_ids": made_up,
        "seq_len": seq_len if made_up else None,
        "first_seq_id": first if made_up else None,
        "tokens_known": tok is not None,
        "digest": digest,
    }
    if w is None:
        try:  # a new cache (or one whose creation by this same import was interrupted, finished)
            w = create_cache(
                url,
                d_model=d,
                layers=sorted(arrays),
                meta={**(meta or {}), "import": info_meta},
                codec=codec,
                chunk_tokens=chunk_tokens,
                storage_options=storage_options,
            )
        except CacheExistsError:  # created by another process a moment ago
            w = open_cache(url, mode="a", storage_options=storage_options)
    with w.segment(meta={"import": info_meta}, once=True) as seg:
        seg.append(
            residuals=arrays,
            tokens=tok if tok is not None else np.full(n, -1, np.int32),
            seq_ids=sid,
            positions=pos,
            labels=lab.astype(np.int8) if lab is not None else None,
        )
        seqs = []
        for a, b in zip(starts, np.r_[starts[1:], n], strict=True):
            ids = tok[a:b] if tok is not None else np.zeros(0, np.int32)
            rec = {"seq_id": int(sid[a]), "token_ids": ids.tolist(), "source": "import"}
            seqs.append(rec)
        seg.add_sequences(seqs)
    if seg.refused:
        prior = None if again else _imported(w, digest)
        if prior is not None:  # the same import, committed by another process meanwhile
            return prior
        raise UserError(
            f"import: not committed: {seg.refused}; a second copy would hold each (seq_id, position) twice. "
            + ("Leave out --seq-ids to number the copy after the cache's last sequence" if not made_up else "Re-run")
        )
    return {"rows": n, "d_model": d, "layers": sorted(arrays), "segment": seg.id, **info_meta}


def import_digest(paths: list[str], sides: list[str | None], mapping: dict, layer, seq_len: int) -> str:
    """What identifies an import: its files' contents and the options that shape the rows."""
    h = hashlib.blake2b(digest_size=32)
    for p in [*paths, *sides]:
        if p is None:
            h.update(b"-")
            continue
        try:
            with open(p, "rb") as f:
                h.update(hashlib.file_digest(f, "blake2b").digest())
        except OSError as e:
            raise UserError(f"import: cannot read {p} ({e.strerror or e}); check the path") from None
    h.update(json.dumps([sorted(mapping.items()), layer, seq_len]).encode())
    return h.hexdigest()


def _imported(w, digest: str) -> dict | None:
    """The live segment this import already made, if any."""
    for s in w.snapshot().segments:
        if (s.meta.get("import") or {}).get("digest") == digest:
            return {"already": s.id, "rows": s.n_rows, "commit": s.commit}
    return None


def _next_seq_id(w) -> int:
    """One past the highest seq_id the cache holds (made-up ids of a further import start there)."""
    snap = w.snapshot()
    top = -1
    for s in snap.segments:
        if s.seq_ranges is not None:
            top = max([top] + [b - 1 for _, b in s.seq_ranges])
        elif s.n_rows:  # recorded before segments carried their runs
            top = max(top, int(snap.seq_ids[s.row_start : s.row_start + s.n_rows].max()))
    return top + 1
