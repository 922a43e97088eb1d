"""SAELens' TopK training step (sae-lens), through its own `SAETrainer.step`.

`SAETrainer.step(batch)` is SAELens' public per-step seam (what `fit()` calls): the
`TopKTrainingSAE` forward with its AuxK loss on `dead_neurons`, backward, grad-norm clip,
Adam, lr schedule and the fired-latent bookkeeping. SAELens' TopK keeps the decoder
unnormalized and rescales activations by the decoder norms instead
(`rescale_acts_by_decoder_norm=True`, its default); that is its normalization path and it is
measured as it ships. Run it with .venv-peers/bin/python.
"""

from __future__ import annotations

import torch
from _common import parse_args, run, setup
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    data, dead = setup(args)
    d_in, n, batch = data.shape[2], args.d_sae, data.shape[1]

    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=d_in, d_sae=n, k=args.k, aux_loss_coefficient=args.aux_alpha, dtype="float32", device="cpu"
        )
    )
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
        return {
            "mse_loss": out.losses["mse_loss"].item(),
            "aux_loss": out.losses["auxiliary_reconstruction_loss"].item(),
        }

    run("saelens", args, data, prepare, step)


if __name__ == "__main__":
    main()
