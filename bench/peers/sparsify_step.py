"""EleutherAI sparsify's training step (eai-sparsify), driven through its own code.

sparsify's `Trainer.fit` is tied to a Hugging Face model forward (it trains from hooks), so
this script runs the body of its loop for `loss_fn="fvu"`, one SAE, no accumulation, in the
same order and through the same calls: `set_decoder_norm_to_unit_norm`, the dead mask from
`num_tokens_since_fired > dead_feature_threshold`, `SparseCoder.forward(x, y, dead_mask,
total_variance)` (fused top-k encoder, embedding_bag decoder, AuxK), `fvu + auxk_alpha *
auxk_loss` backward, `remove_gradient_parallel_to_decoder_directions`, torch Adam (what
sparsify falls back to without bitsandbytes) at its width-scaled default lr, the linear
warmup schedule, and the dead-latent counter update. Run it with .venv-peers/bin/python.
"""

from __future__ import annotations

import torch
from _common import parse_args, run, setup
from sparsify import SparseCoder, SparseCoderConfig
from transformers import get_linear_schedule_with_warmup


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    data, dead = setup(args)
    torch.set_float32_matmul_precision("high")  # as Trainer.fit does
    d_in, n = data.shape[2], args.d_sae

    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=n, k=args.k), device="cpu", dtype=torch.float32)
    sae.b_dec.data = torch.from_numpy(data[0].mean(0)).float()  # Trainer's first-step init
    lr = 2e-4 / (n / 2**14) ** 0.5  # Trainer's default when cfg.lr is None
    opt = torch.optim.Adam([dict(params=sae.parameters(), lr=lr)])
    sched = get_linear_schedule_with_warmup(opt, 1000, 10_000)
    threshold = 10_000_000  # TrainConfig.dead_feature_threshold
    counts = torch.zeros(n, dtype=torch.long)
    did_fire = torch.zeros(n, dtype=torch.bool)

    def prepare() -> None:
        counts.zero_()
        counts[dead] = threshold + 1

    def step(x: torch.Tensor) -> dict:
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = counts > threshold
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        fvu, aux = float(out.fvu.detach()), float(out.auxk_loss.detach())
        loss = out.fvu + args.aux_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
        with torch.no_grad():
            counts.add_(x.shape[0])
            counts[did_fire] = 0
            did_fire.zero_()
        return {"fvu": fvu, "aux_loss": aux}

    run("sparsify", args, data, prepare, step)


if __name__ == "__main__":
    main()
