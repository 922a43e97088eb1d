"""What a run reads besides its training batches: the split check, the held-out evaluation rows
(drawn once into OUT/heldout, so a resumed run evaluates on the same ones) and the metrics on
them, and the initialisation sample.

All of it goes through the same loader as training (`run_loader`, built from `[train]`), so
the filters and the split are the training run's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from cache_format.errors import UserError
from cache_format.layout import ROLE_CODES, bits_to_torch
from cache_format.stores.local import atomic_dir

from .config import TrainConfig
from .loader import ShuffledLoader
from .metrics import ReconstructionMetrics
from .row_filters import default_roles
from .sae import SAE
from .split import MIN_HELDOUT_SEQUENCES, split_counts


def run_loader(
    cache,
    layers: list[int],
    tc: TrainConfig,
    split: str,
    batch_size: int,
    seed: int,
    *,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world: int = 1,
    local: bool = False,
    **kw,
) -> ShuffledLoader:
    """The training loader; `local` = this process reads whole batches on the CPU (eval, init)."""
    sharded = split == "train" and not local
    return ShuffledLoader(
        cache,
        layers,
        batch_size,
        seed=seed,
        split=split,
        heldout_fraction=tc.heldout_fraction,
        split_seed=tc.split_seed,
        roles=list(tc.roles) if tc.roles else "auto",
        exclude_position0=tc.exclude_position0,
        exclude_special=tc.exclude_special,
        norm_outlier=tc.norm_outlier,
        window_tokens=tc.shuffle_buffer_tokens,
        threads=tc.loader_threads,
        device="cpu" if local else device,
        rank=rank if sharded else 0,
        world_size=world if sharded else 1,
        max_rows=tc.max_rows if split == "train" else 0,
        **kw,
    )


def check_split(cache, tc: TrainConfig) -> dict:
    """Count both sides of the split; too few held-out sequences is a one-line error."""
    roles = list(tc.roles) if tc.roles else default_roles(cache)
    codes = None if roles is None else [ROLE_CODES[r] for r in roles if r in ROLE_CODES]
    counts = split_counts(cache, tc.split_seed, tc.heldout_fraction, codes)
    if tc.heldout_fraction > 0 and counts["heldout_sequences"] < MIN_HELDOUT_SEQUENCES:
        raise UserError(
            f"only {counts['heldout_sequences']} of {counts['sequences']} sequences are held out "
            f"(train.heldout_fraction={tc.heldout_fraction:g}, train.split_seed={tc.split_seed}); at least "
            f"{MIN_HELDOUT_SEQUENCES} are needed to validate: raise train.heldout_fraction"
        )
    return counts


def heldout_rows(out: Path, cache, layers: list[int], tc: TrainConfig) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The evaluation rows: the first eval_tokens held-out rows of a fixed order, kept in OUT/heldout."""
    d = out / "heldout"
    if not (d / "rows.npy").exists():
        if tc.heldout_fraction <= 0:
            return np.zeros(0, np.int64), {}
        n = tc.eval_tokens
        loader = run_loader(
            cache,
            layers,
            tc,
            "heldout",
            min(4096, max(n, 1)),
            seed=tc.split_seed,
            local=True,
            max_epochs=1,
            drop_last=False,
            announce=False,
        )
        rows, parts = [], {L: [] for L in layers}
        got = 0
        for b in loader:
            take = min(len(b), n - got)
            rows.append(b.rows[:take])
            for L in layers:
                parts[L].append(b.residuals[L][:take].to(torch.bfloat16).view(torch.int16).numpy())
            got += take
            if got >= n:
                break
        loader.close()
        for stale in d.parent.glob(f".{d.name}.tmp*"):  # leftovers of a killed run
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_dir(d) as tmp:
            for L in layers:
                np.save(tmp / f"L{L}.npy", np.concatenate(parts[L]))
            np.save(tmp / "rows.npy", np.concatenate(rows))
    rows = np.load(d / "rows.npy", allow_pickle=False)  # OUT may come from elsewhere: data only
    return rows, {L: np.load(d / f"L{L}.npy", mmap_mode="r", allow_pickle=False) for L in layers}


@torch.no_grad()
def heldout_metrics(sae: SAE, data: np.ndarray, device: torch.device) -> dict:
    """The reconstruction metrics of `sae` on one layer's held-out rows (stored bf16 bits), as it
    encodes after training (BatchTopK: at its threshold, so L0 is measured)."""
    m = ReconstructionMetrics(sae.d_sae)
    for i in range(0, len(data), 4096):
        x = bits_to_torch(np.array(data[i : i + 4096])).float().to(device)
        vals, idx = sae.encode(x)
        m.update(x, sae.decode(vals, idx), vals, idx)
    return m.compute()


def init_sample(cache, layers: list[int], tc: TrainConfig) -> dict[int, torch.Tensor]:
    """geometric_median_samples train rows (another seed than training's) for b_dec and scale."""
    n = tc.geometric_median_samples
    loader = run_loader(
        cache,
        layers,
        tc,
        "train",
        min(n, 4096),
        seed=tc.seed + 7919,
        local=True,
        max_epochs=1,
        drop_last=False,
        announce=False,
    )
    parts = {L: [] for L in layers}
    got = 0
    for b in loader:
        for L in layers:
            parts[L].append(b.residuals[L])
        got += len(b)
        if got >= n:
            break
    loader.close()
    return {L: torch.cat(v)[:n] for L, v in parts.items()}
