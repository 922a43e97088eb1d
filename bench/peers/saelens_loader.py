"""SAELens' cached-activations loader (sae-lens `ActivationsStore`), writing and reading.

`--write`: store the driver's rows (.npy, (tokens, d_in) float32) in SAELens' own cache
format, the one `CacheActivationsRunner` produces: a Hugging Face dataset saved to disk with
one Array2D(context_size, d_in) column named after the hook plus `token_ids`.

Otherwise: time `ActivationsStore` over that cache as training uses it (`next(store)`: cached
reads of `store_batch_size_prompts` contexts, then its mixing buffer) and print ONE JSON line.
In sae-lens 6.x the mixing buffer holds `n_batches_in_buffer * context_size` tokens, so the
documented 80k-token buffer (20 batches x 32 prompts x 128 tokens = 81,920) is
`n_batches_in_buffer = buffer_tokens / context_size`. Run it with .venv-peers/bin/python.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

HOOK = "blocks.0.hook_resid_post"


def write(npy: str, out: str, context: int) -> None:
    from datasets import Array2D, Dataset, Features, Sequence, Value

    x = np.load(npy, mmap_mode="r")
    n_seq, d = x.shape[0] // context, x.shape[1]
    features = Features(
        {
            HOOK: Array2D(shape=(context, d), dtype="float32"),
            "token_ids": Sequence(Value(dtype="int32"), length=context),
        }
    )
    tokens = np.random.default_rng(0).integers(0, 50_000, (n_seq, context), dtype=np.int32)

    def gen():
        for s in range(n_seq):
            yield {HOOK: np.asarray(x[s * context : (s + 1) * context], dtype=np.float32), "token_ids": tokens[s]}

    Dataset.from_generator(gen, features=features).save_to_disk(out)


def read(args) -> None:
    from sae_lens.training.activations_store import ActivationsStore

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    store = ActivationsStore(
        model=None,
        dataset=None,
        streaming=False,
        hook_name=HOOK,
        hook_head_index=None,
        context_size=args.context,
        d_in=args.d_in,
        n_batches_in_buffer=args.buffer_tokens // args.context,
        total_training_tokens=args.tokens,
        store_batch_size_prompts=args.prompts,
        train_batch_size_tokens=args.batch,
        prepend_bos=False,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
        cached_activations_path=args.cache,
    )
    n_batches = args.tokens // args.batch
    first = None
    checksum = 0.0
    for i in range(n_batches):
        b = next(store)
        if i == 0:
            first = time.perf_counter() - t0
            t1 = time.perf_counter()
        assert b.shape == (args.batch, args.d_in) and b.dtype == torch.float32
        checksum += float(b[0, 0])
    total = time.perf_counter() - t0
    steady = time.perf_counter() - t1
    print(
        json.dumps(
            {
                "side": "saelens",
                "tokens": n_batches * args.batch,
                "batch": args.batch,
                "d_in": args.d_in,
                "buffer_tokens": store.n_batches_in_buffer * store.training_context_size,
                "threads": torch.get_num_threads(),
                "first_batch_s": first,
                "total_s": total,
                "tokens_per_s": n_batches * args.batch / total,
                "steady_tokens_per_s": (n_batches - 1) * args.batch / steady,
                "checksum": checksum,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", help="write mode: the .npy of rows to store")
    p.add_argument("--cache", required=True, help="the SAELens cache directory")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--tokens", type=int, default=0)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--prompts", type=int, default=32, help="store_batch_size_prompts")
    p.add_argument("--buffer-tokens", type=int, default=81_920)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.rows:
        write(args.rows, args.cache, args.context)
    else:
        read(args)


if __name__ == "__main__":
    main()
