"""SAELens' training step of one SAE kind (sae-lens), through its own `SAETrainer.step`.

`SAETrainer.step(batch)` is SAELens' public per-step seam (what `fit()` calls): the training
SAE's forward with its auxiliary or sparsity loss (AuxK on `dead_neurons` for topk, batchtopk
and matryoshka; the L0 STE penalty for jumprelu; the decoder-norm-weighted L1 for standard),
backward, grad-norm clip, Adam, lr schedule, the coefficient warmup and the fired-latent
bookkeeping. SAELens' TopK kinds keep the decoder unnormalized and rescale activations by the
decoder norms instead (`rescale_acts_by_decoder_norm=True`, its default); that is measured as
it ships. With `--l0`, the JumpReLU thresholds (or the standard SAE's encoder bias) are set
from the first batch so each latent fires on l0/d_sae of the rows, as on every side. Run it
with .venv-peers/bin/python.
"""

from __future__ import annotations

import torch
from _common import firing_cut, matryoshka_sizes, parse_args, run, setup
from sae_lens import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer


def build(args, d_in: int):
    kw = dict(d_in=d_in, d_sae=args.d_sae, dtype="float32", device="cpu")
    if args.arch == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=args.k, aux_loss_coefficient=args.aux_alpha, **kw))
    if args.arch == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=args.k, aux_loss_coefficient=args.aux_alpha, **kw))
    if args.arch == "matryoshka":
        cfg = MatryoshkaBatchTopKTrainingSAEConfig(
            k=args.k, aux_loss_coefficient=args.aux_alpha, matryoshka_widths=matryoshka_sizes(args.d_sae), **kw
        )
        return MatryoshkaBatchTopKTrainingSAE(cfg)
    if args.arch == "jumprelu":
        return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(l0_coefficient=args.coefficient, **kw))
    if args.arch == "relu":
        return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=args.coefficient, **kw))
    raise SystemExit(f"unknown --arch {args.arch}")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    data, dead = setup(args)
    d_in, batch = data.shape[2], data.shape[1]
    sae = build(args, d_in)
    if args.l0:
        with torch.no_grad():
            x = torch.from_numpy(data[0].copy())
            cut = firing_cut(sae.encode_with_hidden_pre(x)[1], args.l0)
            if args.arch == "jumprelu":
                sae.threshold.data = cut.clamp_min(1e-6)
            else:
                sae.b_enc.data -= cut
    window = 1000  # SAETrainerConfig.dead_feature_window, in steps
    cfg = SAETrainerConfig(
        total_training_samples=batch * 10_000,
        train_batch_size_samples=batch,
        lr=2e-4,
        lr_end=2e-4,
        dead_feature_window=window,
        device="cpu",
    )
    trainer = SAETrainer(cfg, sae, data_provider=iter(()))

    def prepare() -> None:
        trainer.n_forward_passes_since_fired.zero_()
        trainer.n_forward_passes_since_fired[dead] = window + 1

    def step(x: torch.Tensor) -> dict:
        out = trainer.step(x)
        trainer.n_training_steps += 1  # fit() advances it after step()
        losses = {k: float(v.item()) for k, v in out.losses.items()}
        return {
            "mse_loss": losses["mse_loss"],
            "aux_loss": losses.get("auxiliary_reconstruction_loss", 0.0),
            "l0": float((out.feature_acts != 0).sum(-1).float().mean()),
        }

    run("saelens", args, data, prepare, step)


if __name__ == "__main__":
    main()
