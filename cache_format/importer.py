"""`import`: an existing activation dump (safetensors or .npy, like the 000 card's) becomes a cache."""

from __future__ import annotations

import re

import numpy as np

from .errors import CacheError, UserError
from .opener import open_cache


def _layer_of(key: str, mapping: dict[str, int]) -> int:
    if key in mapping:
        return mapping[key]
    nums = re.findall(r"\d+", key)
    if not nums:
        raise UserError(f"import: cannot tell the layer of key {key!r}; map it with --map {key}=LAYER")
    return int(nums[-1])


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
            raise UserError(f"import: {p}: expected a .safetensors or .npy file")
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
    codec: str = "blosc-zstd1",
    chunk_tokens: int = 4096,
) -> dict:
    """Turn a dump into a new cache (or a new segment of an existing one with the same layers)."""
    from .writer import create_cache

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
    if made_up:  # documented: consecutive blocks of seq_len rows become sequences 0, 1, 2, ...
        sid = np.arange(n, dtype=np.int64) // seq_len
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
        "tokens_known": tok is not None,
    }
    try:
        w = open_cache(url, mode="a", storage_options=storage_options)
    except CacheError:
        w = create_cache(
            url,
            d_model=d,
            layers=sorted(arrays),
            meta={**(meta or {}), "import": info_meta},
            codec=codec,
            chunk_tokens=chunk_tokens,
            storage_options=storage_options,
        )
    with w.segment(meta={"import": info_meta}) as seg:
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
    return {"rows": n, "d_model": d, "layers": sorted(arrays), **info_meta}
