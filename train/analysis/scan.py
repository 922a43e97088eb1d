"""The streaming pass of feature analysis: encode a cache's rows chunk by chunk on dask.

Which rows are scanned is a `RowSelection`: a side of the sequence split (`cache_format.split`,
the same hash as training, so analysis sees the held-out rows training never saw), with the
given roles. Chunks are encoded in parallel (a LocalCluster of threads, or `--scheduler ADDRESS`
for a real cluster) into sparse codes plus mergeable reconstruction metrics; only the chunks
completed in cache order are kept, so the result does not depend on task timing.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

import cache_format as cf
from cache_format.commandline import dask_client
from cache_format.errors import UserError
from cache_format.layout import role_codes
from cache_format.split import Split

from .. import dist
from ..metrics import ReconstructionMetrics
from ..sae import SAE, TopKSAE

# -- which rows an analysis scans --------------------------------------------------------------

ROW_SETS = ("heldout", "train", "all")


@dataclass
class RowSelection:
    """Which rows are scanned: a side of the sequence split (by hash), with the given roles."""

    seed: int = 0
    fraction: float = 0.01
    roles: tuple[int, ...] | None = None  # None = every role
    rows: str = "heldout"  # heldout | train | all: which side of the split
    labeled: bool = False  # keep only rows with a correctness label (label >= 0)

    @property
    def split(self) -> Split:
        return Split(self.seed, self.fraction)

    def keep(self, cols: dict) -> np.ndarray:
        """Mask of the rows of a chunk's columns that this selection scans."""
        keep = self.split.side(cols["seq_ids"], self.rows)
        if self.roles is not None:
            keep &= np.isin(cols["roles"], self.roles)
        if self.labeled:
            keep &= cols["labels"] >= 0
        return keep

    def describe(self) -> str:
        """What the rows are, in words (for errors and the report)."""
        side = {"heldout": "held-out", "train": "train-split", "all": "all"}[self.rows]
        return f"{side}{' labeled' if self.labeled else ''} rows (split seed {self.seed}, fraction {self.fraction:g})"

    def as_dict(self) -> dict:
        return {
            "seed": self.seed,
            "fraction": self.fraction,
            "roles": list(self.roles) if self.roles else None,
            "rows": self.rows,
            "labeled": self.labeled,
        }

    @classmethod
    def of(cls, sae: SAE, default: Split) -> RowSelection:
        """The split the SAE recorded (train's export: `split: {seed, fraction, roles}`), else `default`
        (published SAEs record none)."""
        record = (sae.cfg or {}).get("split")
        split = Split.from_record(record, default)
        roles = record.get("roles") if isinstance(record, dict) else None
        return cls(split.seed, split.fraction, role_codes(roles) if roles else None)


# -- the streaming pass ------------------------------------------------------------------------

ENCODE_BATCH = 4096


@dataclass
class ChunkCodes:
    chunk: int
    scanned: int  # rows in the chunk
    rows: np.ndarray  # global row index of each kept row
    columns: dict[str, np.ndarray]  # tokens, seq_ids, positions, labels, roles of kept rows
    vals: np.ndarray | None  # (n, k) float32
    idx: np.ndarray | None  # (n, k) int32
    metrics: ReconstructionMetrics
    nbytes: int = 0


@functools.lru_cache(maxsize=8)
def _open(url: str, n_tokens: int):
    """One reader per worker process and cache snapshot (keyed by its row count)."""
    c = cf.open_cache(url)
    if c.n_tokens < n_tokens:
        raise UserError(f"{url}: the cache shrank while being analyzed; re-run")
    return c


_ON_DEVICE: dict = {}
_ON_DEVICE_LOCK = threading.Lock()


def _on_device(sae: TopKSAE, device: str, token: str) -> TopKSAE:
    """One copy of the SAE per worker process, scan and device (the scattered one stays on
    CPU). `token` is unique per scan, so a copy is never mistaken for another SAE's."""
    if device == "cpu":
        return sae
    with _ON_DEVICE_LOCK:
        if token not in _ON_DEVICE:
            import copy

            _ON_DEVICE.clear()  # one scan at a time per worker: drop the previous SAE's copy
            _ON_DEVICE[token] = copy.deepcopy(sae).to(device).eval()
        return _ON_DEVICE[token]


def _scan_chunk(
    url: str,
    n_tokens: int,
    layer: int,
    i: int,
    sae: TopKSAE,
    split: RowSelection,
    want_codes: bool,
    device: str = "cpu",
    token: str = "",
) -> ChunkCodes:
    sae = _on_device(sae, device, token)
    c = _open(url, n_tokens)
    cols = c.read_chunk_rows(i)
    keep = split.keep(cols)
    start = int(c.chunk_bounds()[i])
    metrics = ReconstructionMetrics(sae.d_sae)
    n_scanned = len(cols["seq_ids"])
    rows = np.flatnonzero(keep)
    kept = {k: v[rows] for k, v in cols.items()}
    if len(rows) == 0:
        return ChunkCodes(i, n_scanned, rows + start, kept, None, None, metrics)
    raw = c.read_chunk(layer, i)
    x_all = torch.from_numpy(np.asarray(raw[rows], dtype=np.float32)).to(device)
    vals_out, idx_out = [], []
    with torch.no_grad():
        for a in range(0, len(rows), ENCODE_BATCH):
            x = x_all[a : a + ENCODE_BATCH]
            vals, idx = sae.encode(x)
            metrics.update(x, sae.decode(vals, idx), vals, idx)
            if want_codes:
                vals_out.append(vals.float().cpu().numpy())
                idx_out.append(idx.to(torch.int32).cpu().numpy())
    vals = np.concatenate(vals_out) if want_codes else None
    idx = np.concatenate(idx_out) if want_codes else None
    return ChunkCodes(i, n_scanned, rows + start, kept, vals, idx, metrics, nbytes=raw.nbytes)


def analysis_client(scheduler: str | None = None, workers: int | None = None) -> contextlib.AbstractContextManager:
    """A client on `scheduler`, else a LocalCluster of threads (chunk decode and the SAE
    matmuls release the GIL, and threads share the SAE without copying it)."""
    n = workers or max(1, min(4, os.cpu_count() or 1))
    return dask_client(scheduler or "", n_workers=1, threads_per_worker=n, processes=False, fix="check --scheduler")


@dataclass
class ScanResult:
    url: str
    layer: int
    split: RowSelection
    rows: np.ndarray
    columns: dict[str, np.ndarray]
    vals: np.ndarray | None
    idx: np.ndarray | None
    metrics: ReconstructionMetrics
    scanned: int
    seconds: float
    chunks: int = 0
    info: dict = field(default_factory=dict)


def scan(
    url: str,
    sae: TopKSAE,
    layer: int,
    split: RowSelection,
    *,
    max_tokens: int = 1_000_000,
    want_codes: bool = True,
    scheduler: str | None = None,
    client=None,
    progress: bool = True,
    device: str | None = "auto",
) -> ScanResult:
    """Encode the held-out rows of `layer`, chunk by chunk in cache order, on dask.

    Chunks are submitted in order with a bounded number in flight; the pass stops once the
    chunks completed in order hold at least `max_tokens` kept rows and keeps exactly those
    chunks (whole chunks, so codes and metrics cover the same rows), so the result does not
    depend on task timing.
    """
    from dask.distributed import wait
    from tqdm import tqdm

    c = cf.open_cache(url)
    if layer not in c.layers:
        raise UserError(f"layer {layer} is not in the cache {url} (it has {c.layers}); pass --layer one of them")
    if c.d_model != sae.d_in:
        raise UserError(
            f"the SAE takes d_in={sae.d_in} but the cache's d_model is {c.d_model}; pair the SAE with its cache"
        )
    n_chunks = c.n_chunks
    sae = sae.cpu().eval()
    device = dist.resolve_device(device)
    token = uuid.uuid4().hex
    t0 = time.perf_counter()
    results: dict[int, ChunkCodes] = {}
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(analysis_client(scheduler))
        [sae_f] = client.scatter([sae], broadcast=True)
        in_flight = max(4, 2 * sum(client.nthreads().values()))
        bar = stack.enter_context(
            tqdm(
                total=c.n_tokens,
                unit="tok",
                unit_scale=True,
                desc=f"scan L{layer}",
                disable=not progress,
                dynamic_ncols=True,
            )
        )
        next_chunk, prefix, kept_prefix, mb = 0, 0, 0, 0.0
        pending = set()
        while True:
            while next_chunk < n_chunks and len(pending) < in_flight and kept_prefix < max_tokens:
                pending.add(
                    client.submit(
                        _scan_chunk,
                        c.url,
                        c.n_tokens,
                        layer,
                        next_chunk,
                        sae_f,
                        split,
                        want_codes,
                        device,
                        token,
                        key=f"scan-{layer}-{next_chunk}-{token}",
                        pure=False,
                    )
                )
                next_chunk += 1
            if not pending:
                break
            done, pending = wait(pending, return_when="FIRST_COMPLETED")
            for fut in done:
                r = fut.result()
                results[r.chunk] = r
                mb += r.nbytes / 2**20
                bar.update(r.scanned)
                bar.set_postfix_str(f"{mb / max(time.perf_counter() - t0, 1e-9):.0f} MB/s", refresh=False)
            while prefix in results and kept_prefix < max_tokens:
                kept_prefix += len(results[prefix].rows)
                prefix += 1
            if kept_prefix >= max_tokens:
                for fut in pending:
                    fut.cancel()
                pending = set()
    ordered = [results[i] for i in range(prefix)]
    return _combine(c.url, layer, split, ordered, sae.d_sae, time.perf_counter() - t0)


def _combine(url, layer, split, parts: list[ChunkCodes], d_sae: int, seconds: float) -> ScanResult:
    metrics = ReconstructionMetrics(d_sae)
    for r in parts:
        metrics.merge(r.metrics)
    coded = [r for r in parts if r.vals is not None]
    return ScanResult(
        url=url,
        layer=layer,
        split=split,
        rows=np.concatenate([r.rows for r in parts]) if parts else np.zeros(0, np.int64),
        columns={k: np.concatenate([r.columns[k] for r in parts]) for k in (parts[0].columns if parts else {})},
        vals=_padded([r.vals for r in coded]),
        idx=_padded([r.idx for r in coded]),
        metrics=metrics,
        scanned=sum(r.scanned for r in parts),
        seconds=seconds,
        chunks=len(parts),
    )


def _padded(parts: list[np.ndarray]) -> np.ndarray | None:
    """Chunks' codes stacked; the kinds without a fixed k code each chunk as wide as its busiest
    row, so narrower chunks are padded with zero codes (value 0 at index 0: no activation)."""
    if not parts:
        return None
    width = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in parts])
