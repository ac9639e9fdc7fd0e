"""SCALEVAE: the Gaussian-mixture-prior VAE of SCALE as an scvi-tools module."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch
from scvi import REGISTRY_KEYS
from scvi.module._constants import MODULE_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch.distributions import Normal

from ._components import (
    SCALEDecoder,
    SCALEEncoder,
    _is_sparse_enough,
    csr_from_dense,
    csr_with_values,
)
from ._objectives import (
    bernoulli_log_likelihood,
    gmm_kl,
    importance_log_weights,
    iwae_bound,
    log_mean_exp,
    mean_field_responsibilities,
)
from ._prior import GaussianMixturePrior

Objective = Literal["elbo", "iwae", "dreg"]
OBJECTIVES = ("elbo", "iwae", "dreg")
X_BINARIZED_KEY = "x_binarized"


def validate_objective(
    objective: str, n_particles: int, particle_chunk_size: int | None = None
) -> None:
    """Raise a ``ValueError`` for an unknown objective or a bad particle setting."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
    if n_particles < 1:
        raise ValueError(f"n_particles must be >= 1, got {n_particles}.")
    if particle_chunk_size is not None and particle_chunk_size < 1:
        raise ValueError(f"particle_chunk_size must be >= 1 or None, got {particle_chunk_size}.")


def allow_missing_depth_offset(module: torch.nn.Module, state_dict: dict, prefix: str) -> None:
    """Load a state dict saved before the depth offset existed as it was trained.

    Such models (version 0.1.0) have no ``log_mean_depth`` buffer: it is filled with zeros and
    the module's ``depth_offset`` is turned off.
    """
    key = prefix + "log_mean_depth"
    if key not in state_dict:
        state_dict[key] = torch.zeros_like(module.log_mean_depth)
        module.depth_offset = False


def allow_missing_batch_norm(module: torch.nn.Module, state_dict: dict, prefix: str) -> None:
    """Load a state dict saved without the encoder's batch norm as it was trained.

    Models saved before batch norm became the encoder's default (version 0.1.0) have no
    batch-norm parameters: each batch-norm layer the state dict lacks is replaced by an
    identity, which is the network those models were trained as.
    """
    for name, child in list(module.named_modules()):
        if not isinstance(child, torch.nn.BatchNorm1d):
            continue
        if prefix + name + ".running_mean" in state_dict:
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child_name, torch.nn.Identity())


def binarize(x: torch.Tensor) -> torch.Tensor:
    """``(x > 0)`` as float, keeping a sparse tensor sparse."""
    if x.layout == torch.strided:
        return (x > 0).to(torch.float32)
    x = x.to_sparse_csr() if x.layout != torch.sparse_csr else x
    return csr_with_values(x, (x.values() > 0).to(torch.float32))


def binarize_for_encoding(x: torch.Tensor) -> torch.Tensor:
    """Binarize a minibatch into the form the model computes with.

    A sparse minibatch stays sparse (CSR); a dense one with at most
    ``SPARSE_PATH_MAX_DENSITY`` nonzeros (scATAC usually has 1-5 %) becomes CSR, so that the
    encoder's first layer and the reconstruction term cost what its open peaks cost; a
    denser one stays dense.
    """
    if x.layout != torch.strided or x.dim() != 2:
        return binarize(x)
    is_open = x > 0
    return binarize(csr_from_dense(is_open)) if _is_sparse_enough(is_open) else is_open.float()


class SCALEVAE(BaseModuleClass):
    """Variational autoencoder with a Gaussian-mixture prior for binarized scATAC-seq.

    Generative model: ``c ~ Cat(pi)``, ``z | c ~ N(mu_c, diag(sigma2_c))``,
    ``x_p | z ~ Bernoulli(sigmoid(f(z))_p)``; inference ``q(z|x) = N(m(x), diag(s2(x)))``
    and ``q(c|x) = p(c|z)`` (the responsibilities).

    Parameters
    ----------
    n_input
        Number of peaks.
    n_batch
        Number of batches (0 or 1: none).
    n_centroids
        Number of mixture components ``K``.
    n_latent
        Latent dimensionality ``D``.
    n_hidden
        Hidden-layer widths of the encoder.
    n_hidden_decoder
        Hidden-layer widths of the decoder; ``()`` gives SCALE's linear decoder.
    n_continuous_cov
        Number of continuous covariates.
    n_cats_per_cov
        Number of categories of each extra categorical covariate.
    dropout_rate
        Dropout in the encoder.
    use_batch_norm
        Batch normalization of the hidden layers in ``"encoder"`` (default), ``"decoder"``,
        ``"both"`` or ``"none"``. Without it, most of the encoder's ReLU units stop
        responding to any cell during training (forebrain, ``train()`` defaults: 668 of 1,024
        first-layer and 96 of 128 second-layer units inactive at the end) and the clustering
        is worse (forebrain ARI, k-means, seeds 0 and 2: 0.648 / 0.584 without, 0.668 / 0.662
        with; ``benchmarks/NOTES.md``). ``"none"`` is the original SCALE's encoder.
    use_layer_norm
        Layer normalization, in ``"encoder"``, ``"decoder"``, ``"both"`` or ``"none"``.
    encode_covariates
        Give the covariates to the encoder too (they always reach the decoder).
    deeply_inject_covariates
        Inject covariates into every hidden layer.
    objective
        ``"elbo"`` (closed-form SCALE ELBO), ``"iwae"`` or ``"dreg"`` (importance weighted,
        ``n_particles`` samples; DReG uses the doubly-reparameterized gradient).
    n_particles
        Number of importance samples for ``"iwae"``/``"dreg"``.
    particle_chunk_size
        Particles decoded at a time in the importance-weighted objectives.
    gamma_from
        ``q(c|x)`` in the closed-form ELBO: the responsibilities ``p(c|z)`` at the posterior
        ``"mean"`` or at the ``"sample"`` used for the reconstruction (as the original
        SCALE), or ``"expected"``: the exact optimum ``softmax_c(log pi_c +
        E_q(z|x)[log N(z; mu_c, sigma2_c)])`` of the mean-field ELBO.
    min_var
        Variance floor of the prior components.
    depth_offset
        Add ``log(depth / mean depth)`` to the decoder's logits, where depth is the number of
        open peaks of the cell, so that sequencing depth is explained by the likelihood and
        not by the latent (and so not by the clusters). ``False`` is the original SCALE.
    """

    def __init__(
        self,
        n_input: int,
        n_batch: int = 0,
        n_centroids: int = 30,
        n_latent: int = 10,
        n_hidden: Sequence[int] = (1024, 128),
        n_hidden_decoder: Sequence[int] = (),
        n_continuous_cov: int = 0,
        n_cats_per_cov: Iterable[int] | None = None,
        dropout_rate: float = 0.0,
        use_batch_norm: Literal["encoder", "decoder", "none", "both"] = "encoder",
        use_layer_norm: Literal["encoder", "decoder", "none", "both"] = "none",
        encode_covariates: bool = True,
        deeply_inject_covariates: bool = False,
        objective: Objective = "elbo",
        n_particles: int = 1,
        particle_chunk_size: int | None = 16,
        gamma_from: Literal["mean", "sample", "expected"] = "mean",
        min_var: float = 1e-4,
        depth_offset: bool = True,
    ):
        super().__init__()
        validate_objective(objective, n_particles, particle_chunk_size)
        if gamma_from not in ("mean", "sample", "expected"):
            raise ValueError(
                f"gamma_from must be 'mean', 'sample' or 'expected', got {gamma_from!r}."
            )
        self.n_input = n_input
        self.n_batch = n_batch
        self.n_centroids = n_centroids
        self.n_latent = n_latent
        self.objective = objective
        self.n_particles = n_particles
        self.particle_chunk_size = particle_chunk_size
        self.gamma_from = gamma_from
        self.depth_offset = depth_offset
        self.register_buffer("log_mean_depth", torch.zeros(()))
        self.encode_covariates = encode_covariates

        cat_list = [n_batch] + list(n_cats_per_cov or [])
        self.z_encoder = SCALEEncoder(
            n_input=n_input,
            n_output=n_latent,
            n_hidden=tuple(n_hidden),
            n_cat_list=cat_list if encode_covariates else None,
            n_cont=n_continuous_cov if encode_covariates else 0,
            dropout_rate=dropout_rate,
            use_batch_norm=use_batch_norm in ("encoder", "both"),
            use_layer_norm=use_layer_norm in ("encoder", "both"),
            deep_inject_covariates=deeply_inject_covariates,
        )
        self.decoder = SCALEDecoder(
            n_input=n_latent,
            n_output=n_input,
            n_hidden=tuple(n_hidden_decoder),
            n_cat_list=cat_list,
            n_cont=n_continuous_cov,
            use_batch_norm=use_batch_norm in ("decoder", "both"),
            use_layer_norm=use_layer_norm in ("decoder", "both"),
        )
        self.prior = GaussianMixturePrior(n_centroids, n_latent, min_var=min_var)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        allow_missing_depth_offset(self, state_dict, prefix)
        allow_missing_batch_norm(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _covariates(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        return {
            MODULE_KEYS.BATCH_INDEX_KEY: tensors.get(REGISTRY_KEYS.BATCH_KEY),
            MODULE_KEYS.CONT_COVS_KEY: tensors.get(REGISTRY_KEYS.CONT_COVS_KEY),
            MODULE_KEYS.CAT_COVS_KEY: tensors.get(REGISTRY_KEYS.CAT_COVS_KEY),
        }

    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict:
        return {MODULE_KEYS.X_KEY: tensors[REGISTRY_KEYS.X_KEY], **self._covariates(tensors)}

    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict
    ) -> dict:
        return {
            MODULE_KEYS.Z_KEY: inference_outputs[MODULE_KEYS.Z_KEY],
            MODULE_KEYS.LIBRARY_KEY: inference_outputs.get(MODULE_KEYS.LIBRARY_KEY),
            **self._covariates(tensors),
        }

    @staticmethod
    def _log_depth(x: torch.Tensor) -> torch.Tensor:
        """``log`` of the number of open peaks of each cell (at least 1), shape ``(B,)``."""
        if x.layout == torch.strided:
            depth = x.sum(-1)
        else:
            depth = torch.diff(x.crow_indices()).to(torch.float32)
        return depth.clamp_min(1.0).log()

    def _depth_logit_offset(self, library: torch.Tensor | None) -> torch.Tensor | float:
        """Logit offset ``log(depth) - log(mean depth)`` per cell, shape ``(B, 1)``."""
        if not self.depth_offset or library is None:
            return 0.0
        return (library - self.log_mean_depth).unsqueeze(-1)

    @staticmethod
    def _cat_list(batch_index, cat_covs) -> list[torch.Tensor]:
        cats = [batch_index] if batch_index is not None else []
        if cat_covs is not None:
            cats += list(torch.split(cat_covs, 1, dim=1))
        return cats

    # ------------------------------------------------------------------ model
    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        n_samples: int = 1,
    ) -> dict[str, torch.Tensor | Normal]:
        """Encode the binarized peaks into ``q(z|x)`` and draw ``z``.

        The binarized minibatch (CSR when sparse enough) is returned under
        ``"x_binarized"``, for the loss to reuse.
        """
        x = binarize_for_encoding(x)
        if self.encode_covariates:
            cats, cont = self._cat_list(batch_index, cat_covs), cont_covs
        else:
            cats, cont = [], None
        library = self._log_depth(x)
        qz_m, qz_v = self.z_encoder(x, *cats, cont=cont)
        # No argument validation: a diverging run must reach the loss, where training stops
        # with an error that names the epoch (FiniteLossGuard), not fail inside Normal.
        qz = Normal(qz_m, qz_v.sqrt(), validate_args=False)
        z = qz.rsample() if n_samples == 1 else qz.rsample((n_samples,))
        return {
            MODULE_KEYS.QZ_KEY: qz,
            MODULE_KEYS.QZM_KEY: qz_m,
            MODULE_KEYS.QZV_KEY: qz_v,
            MODULE_KEYS.Z_KEY: z,
            MODULE_KEYS.LIBRARY_KEY: library,
            X_BINARIZED_KEY: x,
        }

    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Decode ``z`` into Bernoulli logits of every peak (key ``"px"``).

        With ``library`` (log depth) and ``depth_offset``, the logits are those of a cell of
        that depth; without it, those of a cell of the training data's mean depth.
        """
        logits = self.decoder(z, *self._cat_list(batch_index, cat_covs), cont=cont_covs)
        offset = self._depth_logit_offset(library)
        if isinstance(offset, torch.Tensor):
            # in place: one pass less over the (B, P) logits; nothing saved them for backward
            logits = logits.add_(offset) if logits.dtype == offset.dtype else logits + offset
        return {MODULE_KEYS.PX_KEY: logits}

    def _log_likelihood_fn(self, x: torch.Tensor, tensors: dict[str, torch.Tensor]):
        covs = self._covariates(tensors)
        cats = self._cat_list(covs[MODULE_KEYS.BATCH_INDEX_KEY], covs[MODULE_KEYS.CAT_COVS_KEY])
        cont = covs[MODULE_KEYS.CONT_COVS_KEY]

        offset = self._depth_logit_offset(self._log_depth(x))

        def log_likelihood(z: torch.Tensor) -> torch.Tensor:
            return bernoulli_log_likelihood(self.decoder(z, *cats, cont=cont) + offset, x)

        return log_likelihood

    @torch.no_grad()
    def init_decoder_bias(self, open_fraction: torch.Tensor, mean_depth: float) -> None:
        """Start the decoder at each peak's observed open fraction.

        Sets the output bias to ``logit(open_fraction)`` so that training does not spend
        its first hundreds of steps learning the overall sparsity of the data, and records
        the mean number of open peaks per cell (the reference of the depth offset).
        """
        self.log_mean_depth.fill_(float(np.log(max(mean_depth, 1.0))))
        bias = self.decoder.output.fc_layers[0][0].bias
        frac = torch.as_tensor(open_fraction, dtype=bias.dtype, device=bias.device)
        bias.copy_(torch.logit(frac.clamp(1e-4, 1 - 1e-4)))

    def cluster_probabilities(self, qz_m: torch.Tensor) -> torch.Tensor:
        """``p(c | z)`` at the posterior mean, shape ``(B, K)``."""
        return self.prior.responsibilities(qz_m)

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
        objective: Objective | None = None,
    ) -> LossOutput:
        """The negative training objective, averaged over the minibatch.

        ``reconstruction_loss`` and ``kl_local`` are per cell and sum to the negative ELBO
        (``objective="elbo"``) or to the negative importance-weighted bound (``"iwae"``,
        ``"dreg"``; there ``reconstruction_loss`` is ``-log p(x|z_k)`` averaged over the
        particles and ``kl_local`` the rest). Both are the true, unweighted quantities even
        while ``kl_weight < 1``; only ``loss`` uses ``kl_weight``.

        Parameters
        ----------
        tensors, inference_outputs, generative_outputs
            As produced by :meth:`forward`.
        kl_weight
            KL warm-up weight ``beta``: the ELBO's KL term, or ``log p(z) - log q(z|x)`` in
            the importance weights, is multiplied by it.
        objective
            Override of the module's objective, e.g. ``"elbo"`` to evaluate the ELBO of a
            model trained with ``"iwae"``.
        """
        objective = objective or self.objective
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
        qz_m = inference_outputs[MODULE_KEYS.QZM_KEY]
        qz_v = inference_outputs[MODULE_KEYS.QZV_KEY]
        x = inference_outputs.get(X_BINARIZED_KEY)
        if x is None:
            x = binarize_for_encoding(tensors[REGISTRY_KEYS.X_KEY].to(qz_m.device))

        if objective == "elbo":
            z = inference_outputs[MODULE_KEYS.Z_KEY]
            logits = generative_outputs[MODULE_KEYS.PX_KEY]
            reconst = -bernoulli_log_likelihood(logits, x)
            if self.gamma_from == "expected":
                gamma = mean_field_responsibilities(self.prior, qz_m, qz_v)
            else:
                gamma = self.prior.responsibilities(qz_m if self.gamma_from == "mean" else z)
            kl = gmm_kl(self.prior, qz_m, qz_v, gamma)
            loss = (reconst + kl_weight * kl).mean()
            return LossOutput(loss=loss, reconstruction_loss=reconst, kl_local=kl)

        log_w, log_lik, log_ratio = importance_log_weights(
            self._log_likelihood_fn(x, tensors),
            self.prior,
            qz_m,
            qz_v,
            n_particles=self.n_particles,
            kl_weight=kl_weight,
            dreg=objective == "dreg",
            chunk_size=self.particle_chunk_size,
            return_log_ratio=True,
        )
        bound = iwae_bound(log_w)
        true_bound = bound if kl_weight == 1.0 else iwae_bound(log_lik + log_ratio)
        reconst = -log_lik.detach().mean(0)
        kl = -true_bound.detach() - reconst
        return LossOutput(loss=-bound.mean(), reconstruction_loss=reconst, kl_local=kl)

    @torch.inference_mode()
    def marginal_ll(
        self,
        tensors: dict[str, torch.Tensor],
        n_mc_samples: int = 100,
        return_mean: bool = False,
        n_mc_samples_per_pass: int | None = None,
    ) -> torch.Tensor | float:
        """Importance-sampled estimate of ``log p(x)`` (higher is better).

        ``log p(x) ~= log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x)``, ``z_k ~ q(z|x)``, with the
        exact mixture density ``p(z)``: the IWAE bound with ``K = n_mc_samples``. Its
        expectation is a lower bound on ``log p(x)`` that never decreases with ``K`` and
        converges to ``log p(x)``; with ``K = 1`` it is a one-sample ELBO. Decoding runs
        ``n_mc_samples_per_pass`` particles at a time, so memory does not grow with ``K``.

        Parameters
        ----------
        tensors
            A minibatch from the model's data loader.
        n_mc_samples
            Number of importance samples ``K``.
        return_mean
            Return the mean over the minibatch instead of one value per cell.
        n_mc_samples_per_pass
            Samples decoded at a time (memory); defaults to ``particle_chunk_size``.

        Returns
        -------
        ``log p(x)`` estimates of shape ``(B,)``, or their mean as a float.
        """
        inference_outputs = self.inference(**self._get_inference_input(tensors))
        qz_m = inference_outputs[MODULE_KEYS.QZM_KEY]
        x = inference_outputs[X_BINARIZED_KEY]
        log_w, _ = importance_log_weights(
            self._log_likelihood_fn(x, tensors),
            self.prior,
            qz_m,
            inference_outputs[MODULE_KEYS.QZV_KEY],
            n_particles=n_mc_samples,
            chunk_size=n_mc_samples_per_pass or self.particle_chunk_size,
        )
        log_px = log_mean_exp(log_w, dim=0)
        return log_px.mean().item() if return_mean else log_px
