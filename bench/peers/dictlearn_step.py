"""dictionary_learning's training step of one SAE kind, through its own trainer's `update`.

`trainer.update(step, x)` is what dictionary_learning's `trainSAE` loop calls per batch: the
trainer's loss (BatchTopK / Matryoshka BatchTopK with AuxK, JumpReLU with its L0 penalty
around `target_l0`, the standard ReLU + L1), backward, its decoder-gradient projection and
renormalization where it does them, clipping, Adam and its schedules. The package
(`dictionary-learning` 0.1.0, installed into .venv-peers with `--no-deps`) imports nnsight at
the top for its activation buffer, which a training step never uses; that one import is
satisfied by an empty module here so that torch and the rest of .venv-peers stay as SAELens
needs them. With `--l0`, the JumpReLU thresholds (or the ReLU encoder bias) are set from the
first batch so each latent fires on l0/d_sae of the rows, as on every side.
Run it with .venv-peers/bin/python.
"""

from __future__ import annotations

import sys
import types

import torch
from _common import firing_cut, parse_args, run, setup

sys.modules.setdefault("nnsight", types.SimpleNamespace(LanguageModel=None))  # the buffer's import only

from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer  # noqa: E402
from dictionary_learning.trainers.jumprelu import JumpReluTrainer  # noqa: E402
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer  # noqa: E402
from dictionary_learning.trainers.standard import StandardTrainer  # noqa: E402


def build(args, d_in: int):
    common = dict(steps=10_000, activation_dim=d_in, dict_size=args.d_sae, layer=0, lm_name="bench", device="cpu")
    if args.arch == "batchtopk":
        return BatchTopKTrainer(k=args.k, auxk_alpha=args.aux_alpha, **common)
    if args.arch == "matryoshka":  # groups of d_sae/8, /8, /4, /2: prefixes d_sae/8, /4, /2, d_sae
        return MatryoshkaBatchTopKTrainer(
            k=args.k, auxk_alpha=args.aux_alpha, group_fractions=[1 / 8, 1 / 8, 1 / 4, 1 / 2], **common
        )
    if args.arch == "jumprelu":
        return JumpReluTrainer(sparsity_penalty=args.coefficient, target_l0=args.l0 or 20.0, **common)
    if args.arch == "relu":
        return StandardTrainer(l1_penalty=args.coefficient, **common)
    raise SystemExit(f"dictionary_learning: no trainer for --arch {args.arch}")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    data, dead = setup(args)
    trainer = build(args, data.shape[2])
    ae = trainer.ae
    if args.l0:
        with torch.no_grad():
            x = torch.from_numpy(data[0].copy())
            if args.arch == "jumprelu":
                ae.threshold.data = firing_cut(ae.encode(x, output_pre_jump=True)[1], args.l0).clamp_min(1e-6)
            else:
                ae.encoder.bias.data -= firing_cut(ae.encoder(x - ae.bias), args.l0)
    counter = getattr(trainer, "num_tokens_since_fired", None)
    state = {"step": 0}

    def prepare() -> None:
        if counter is not None and args.arch in ("batchtopk", "matryoshka"):
            counter.zero_()
            counter[dead] = trainer.dead_feature_threshold + 1

    def step(x: torch.Tensor) -> dict:
        trainer.update(state["step"], x)
        state["step"] += 1
        aux = getattr(trainer, "pre_norm_auxk_loss", 0.0)
        return {"aux_loss": float(aux) if aux is not None else 0.0}

    # its AuxK counts a latent dead only if it did not fire in this batch either (the counter is
    # reset before the aux loss), so at a random init few held-dead latents qualify: timed as it
    # runs, with `aux_ran` recorded rather than required
    run("dictionary_learning", args, data, prepare, step, require_aux=False)


if __name__ == "__main__":
    main()
