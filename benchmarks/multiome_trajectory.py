"""Do the RNA alone and the joint model with the ATAC expert off train the same latent?

On the sci-CAR pair, SCALE on the RNA alone and the joint RNA + ATAC model whose ATAC expert
is switched off from the first step (``multiome.py``'s ``joint_atac_expert_off``: the
posterior is the RNA expert's, the ATAC likelihood is decoded from it without moving it)
compute the same gradient on the RNA encoder, decoder, dispersion and prior. This script
trains the two side by side, step for step, from the same start and on the same data:

- the joint model's RNA networks, dispersion and prior are copied from the RNA-only model;
- both see the same minibatches in the same order (one fixed permutation of the training
  cells, ``train()``'s default batch size);
- both draw the same sampling noise of the bound: the RNA component's particles come from
  one generator seeded with the step number (the joint model's unused ATAC and product
  components get zeros);
- both take ``train()``'s optimizer step with its defaults (:class:`~scale_scvi.train.FusedAdamW`
  with its learning rate, weight decay, epsilon and clipping, read from its signature), the
  KL weight rising linearly over a quarter of the default number of epochs.

It prints, at a few steps, the relative difference between the two RNA encoders' posterior
means on 512 fixed training cells (in evaluation mode), the largest relative difference of
any RNA encoder and decoder parameter, and for each model the median and the range of the
factor by which clipping divided the gradient over the steps so far (its total norm over the
limit; 1 for a step that was not clipped). ``--bias-grads`` also prints, for the first
steps, the parameters whose gradients differ by more than 1e-4 relative, with their norms.
``--freeze-pre-norm-biases`` keeps the biases of the linear layers that batch norm follows at
their initial values in both models (in training, batch norm subtracts any constant per
unit, so the objective does not depend on them and their gradient is rounding noise).

Usage::

    python benchmarks/multiome_trajectory.py --seed 0 --steps 1000
"""

from __future__ import annotations

import argparse
import inspect
import types

import multiome
import numpy as np
import torch
from _common import freeze_pre_norm_biases

CHECKPOINTS = (1, 2, 5, 10, 30, 100, 300, 1000, 2000, 4000)


class _SharedNoise(types.ModuleType):
    """``torch`` for ``scale_scvi.module._objectives``, whose ``randn`` draws the particles'
    noise from :attr:`generator`; for the joint model's three components (ATAC, RNA,
    product) only component :attr:`rna_component`'s, so that it draws exactly what the
    RNA-only model draws."""

    generator = torch.Generator()
    rna_component = 1

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn(self, shape, dtype=None, device=None):
        shape = tuple(shape)
        if shape[0] == 3:
            out = torch.zeros(shape, dtype=dtype, device=device)
            out[self.rna_component] = torch.randn(shape[1:], generator=self.generator, dtype=dtype)
            return out
        return torch.randn(shape, generator=self.generator, dtype=dtype).to(device)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--bias-grads", action="store_true")
    parser.add_argument("--freeze-pre-norm-biases", action="store_true")
    args = parser.parse_args(argv)

    import scvi

    from scale_scvi import SCALE
    from scale_scvi.model._scale import default_max_epochs
    from scale_scvi.module import _objectives
    from scale_scvi.train import FusedAdamW, flush_denormal

    torch.set_num_threads(1)
    noise = _SharedNoise("torch")
    _objectives.torch = noise

    atac, rna = multiome.load_pair()
    perm = np.random.default_rng(args.seed).permutation(atac.n_obs)
    train_idx = np.sort(perm[atac.n_obs // 10 :])  # multiome.py's split
    models = {}
    for name, modalities in (("rna", ("rna",)), ("joint", ("atac", "rna"))):
        scvi.settings.seed = args.seed
        data = multiome.make_mudata(atac, rna)
        SCALE.setup_mudata(data, modalities={f"{m}_layer": m for m in modalities})
        models[name] = SCALE(data, n_centroids=multiome.N_TYPES)
    alone, joint = models["rna"].module, models["joint"].module
    multiome.copy_rna_side(alone, joint)
    joint.expert_active[joint.modalities.index("atac")] = False
    noise.rna_component = joint.modalities.index("rna")

    if args.freeze_pre_norm_biases:
        for model in models.values():
            freeze_pre_norm_biases(model.module)
    defaults = {k: v.default for k, v in inspect.signature(SCALE.train).parameters.items()}
    batch_size = defaults["batch_size"]
    optimizers = {
        name: FusedAdamW(
            model.module.parameters(),
            lr=defaults["lr"],
            eps=defaults["eps"],
            weight_decay=defaults["weight_decay"],
            max_grad_norm=defaults["gradient_clip_val"],
            in_place_layers=model.module.in_place_layers(),
        )
        for name, model in models.items()
    }
    order = np.random.default_rng(100 + args.seed).permutation(train_idx)

    def loader(model, indices, batch_size):
        return model._make_data_loader(
            adata=model.adata,
            indices=indices,
            batch_size=batch_size,
            shuffle=False,
            load_sparse_tensor=True,
        )

    probe = {name: next(iter(loader(m, order[:512], 512))) for name, m in models.items()}
    steps_per_epoch = int(np.ceil(len(order) / batch_size))
    max_epochs = default_max_epochs(atac.n_obs, defaults["train_size"], batch_size)
    warmup = max(1, max_epochs // 4) * steps_per_epoch  # train()'s KL warm-up
    step = 0
    scales: dict[str, list[float]] = {name: [] for name in models}
    with flush_denormal():
        while step < args.steps:
            for t_alone, t_joint in zip(
                loader(models["rna"], order, batch_size),
                loader(models["joint"], order, batch_size),
            ):
                kl_weight = min(1.0, step / warmup)
                grads = {}
                for name, tensors in (("rna", t_alone), ("joint", t_joint)):
                    module = models[name].module
                    module.train()
                    noise.generator.manual_seed(step)
                    _, _, out = module(tensors, loss_kwargs={"kl_weight": kl_weight})
                    optimizers[name].zero_grad()
                    out.loss.backward()
                    if args.bias_grads and step < 3:
                        grads[name] = {
                            n: p.grad.detach().clone()
                            for n, p in module.named_parameters()
                            if p.grad is not None and ("rna" in n or "prior" in n or n == "px_r")
                        }
                    scale = optimizers[name]._grad_scale()  # None: clipping off
                    scales[name].append(1.0 if scale is None else float(scale))
                    optimizers[name].step()
                for n, g in grads.get("rna", {}).items():
                    other = grads["joint"].get(n)
                    if other is not None and _relative(other, g) > 1e-4:
                        print(
                            f"  step {step + 1}: gradient of {n} differs by "
                            f"{_relative(other, g):.2e} (norms {float(g.norm()):.2e}, "
                            f"{float(other.norm()):.2e})"
                        )
                step += 1
                if step in CHECKPOINTS or step == args.steps:
                    with torch.no_grad():
                        alone.eval()
                        joint.eval()
                        z_alone = alone.inference(**alone._get_inference_input(probe["rna"]))
                        z_joint = joint.inference(**joint._get_inference_input(probe["joint"]))
                    latent = _relative(z_joint["qzm_rna"], z_alone["qzm_rna"])
                    params = max(
                        _relative(p, q)
                        for part in ("encoders", "decoders")
                        for p, q in zip(
                            getattr(joint, part)["rna"].parameters(),
                            getattr(alone, part)["rna"].parameters(),
                        )
                    )
                    clip = ", ".join(
                        f"{name} {np.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"
                        for name, v in scales.items()
                    )
                    print(
                        f"step {step}: posterior means differ by {latent:.2e}, "
                        f"parameters by at most {params:.2e}; clipping divided the "
                        f"gradient by {clip}",
                        flush=True,
                    )
                if step >= args.steps:
                    break


if __name__ == "__main__":
    main()
