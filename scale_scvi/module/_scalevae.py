"""SCALEVAE: the Gaussian-mixture-prior VAE of SCALE as an scvi-tools module."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import Literal

import torch
from scvi import REGISTRY_KEYS
from scvi.module.base import LossOutput, auto_move_data
from torch.distributions import Normal

from ._base import AtacLink, Normalization, SCALEModuleBase
from ._components import binarize
from ._constants import ATAC, MODULE_KEYS
from ._feature_stats import open_fraction
from ._lsi import LSIProjection
from ._objectives import (
    gmm_kl,
    importance_log_weights,
    iwae_bound,
    log_mean_exp,
    mean_field_responsibilities,
)

#: ``(use_batch_norm, use_layer_norm)`` of :class:`SCALEVAE` when neither is given.
DEFAULT_NORMALIZATION: tuple[Normalization, Normalization] = ("none", "encoder")


class SCALEVAE(SCALEModuleBase):
    """Variational autoencoder with a Gaussian-mixture prior for binarized scATAC-seq.

    Generative model: ``c ~ Cat(pi)``, ``z | c ~ N(mu_c, diag(sigma2_c))``,
    ``x_p | z ~ Bernoulli(1 - exp(-exp(f(z)_p)))`` (``sigmoid(f(z)_p)``, the original
    SCALE's, with ``atac_link="logit"``); inference ``q(z|x) = N(m(x), diag(s2(x)))``
    and ``q(c|x) = p(c|z)`` (the responsibilities). Its one modality is ``"atac"``.

    Parameters
    ----------
    n_input
        Number of peaks of the registered matrix.
    peak_index
        The peaks the module reads (sorted column indices of the registered matrix); every
        minibatch is cut to them, dense or sparse, and the networks see only those.
        ``None`` (default): every peak.
    use_batch_norm, use_layer_norm
        Normalization of the hidden layers (``"encoder"``, ``"decoder"``, ``"both"`` or
        ``"none"``). Neither given (default): layer normalization of the encoder's hidden
        layers and no batch normalization. Given one, the other is ``"none"`` unless given
        too. Layer norm normalizes each cell's hidden units on their own; batch norm, the
        default of the multimodal module, normalizes them over the minibatch, which on a
        set of a few hundred cells ties a cell's latent to the other cells it is drawn
        with (``benchmarks/NOTES.md``, "The encoder's normalization").
    atac_link
        ``"cloglog"`` (default) or ``"logit"``: how the decoder's output and the depth
        offset become the probability that a peak is open (see
        :class:`~scale_scvi.module.SCALEModuleBase`, whose default, the logit, the
        multimodal module keeps). The complementary log-log is this module's default since
        it was measured on larger sets made from the labeled cells (``benchmarks/NOTES.md``,
        "The default path at 6,000-10,000 cells made from real ones").
    gamma_from
        ``q(c|x)`` in the closed-form ELBO: the responsibilities ``p(c|z)`` at the posterior
        ``"mean"`` or at the ``"sample"`` used for the reconstruction (as the original
        SCALE), or ``"expected"``: the exact optimum ``softmax_c(log pi_c +
        E_q(z|x)[log N(z; mu_c, sigma2_c)])`` of the mean-field ELBO.
    **kwargs
        The arguments of :class:`~scale_scvi.module.SCALEModuleBase` (``n_centroids``,
        ``n_latent``, networks, covariates, ``objective``, ...). Here ``objective="elbo"``
        is SCALE's closed-form ELBO (the KL to the mixture through ``q(c|x)``).
    """

    def __init__(
        self,
        n_input: int,
        gamma_from: Literal["mean", "sample", "expected"] = "mean",
        peak_index: Sequence[int] | None = None,
        use_batch_norm: Normalization | None = None,
        use_layer_norm: Normalization | None = None,
        atac_link: AtacLink = "cloglog",
        n_lsi: int | None = None,
        **kwargs,
    ):
        default_norm = use_batch_norm is None and use_layer_norm is None
        if default_norm:
            use_batch_norm, use_layer_norm = DEFAULT_NORMALIZATION
        super().__init__(
            use_batch_norm=use_batch_norm or "none",
            use_layer_norm=use_layer_norm or "none",
            atac_link=atac_link,
            **kwargs,
        )
        self.default_normalization = default_norm
        if gamma_from not in ("mean", "sample", "expected"):
            raise ValueError(
                f"gamma_from must be 'mean', 'sample' or 'expected', got {gamma_from!r}."
            )
        self.n_input = n_input
        self.modalities = (ATAC,)
        self.gamma_from = gamma_from
        self.n_peaks = self._register_peak_index(peak_index, n_input)
        if n_lsi is not None and (
            isinstance(n_lsi, bool) or not isinstance(n_lsi, Integral) or n_lsi < 1
        ):
            raise ValueError(f"n_lsi must be a positive integer or None, got {n_lsi!r}.")
        self.lsi = LSIProjection(self.n_peaks, int(n_lsi)) if n_lsi is not None else None
        self.z_encoder = self._make_encoder(self._encoder_inputs())
        self.decoder = self._make_decoder(self.n_peaks)
        self._add_prior()
        # marks the state dicts saved since layer norm became the encoder's default
        self.register_buffer("normalization_v2", torch.ones((), dtype=torch.bool))

    @property
    def n_lsi(self) -> int | None:
        """Number of LSI coordinates the encoder reads; ``None`` when it reads the peaks."""
        return None if self.lsi is None else self.lsi.n_components

    def _encoder_inputs(self) -> int:
        return self.n_peaks if self.lsi is None else self.lsi.n_components

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self._restore_saved_encoder_input(state_dict, prefix)
        self._restore_saved_normalization(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _restore_saved_encoder_input(self, state_dict: dict, prefix: str) -> None:
        """Load a state dict saved before the encoder read LSI coordinates: without the
        projection's buffers, the module rebuilds its encoder to read the peaks."""
        if self.lsi is None or prefix + "lsi.basis" in state_dict:
            return
        device = self.normalization_v2.device
        self.lsi = None
        self.z_encoder = self._make_encoder(self.n_peaks).to(device)

    def _restore_saved_normalization(self, state_dict: dict, prefix: str) -> None:
        """Load a state dict saved before layer norm became the encoder's default.

        Such a state dict lacks the ``normalization_v2`` buffer. Built with the default
        normalization, the module then rebuilds its encoder as it was saved: batch norm if
        the state dict holds the encoder's batch-norm statistics (the previous default), no
        normalization otherwise (the first default). Normalizations given explicitly were
        saved in the model's arguments and are built as given.
        """
        key = prefix + "normalization_v2"
        if key in state_dict:
            return
        state_dict[key] = torch.zeros_like(self.normalization_v2)
        if not self.default_normalization:
            return
        encoder = prefix + "z_encoder."
        with_bn = any(k.startswith(encoder) and k.endswith(".running_mean") for k in state_dict)
        self.use_batch_norm = "encoder" if with_bn else "none"
        self.use_layer_norm = "none"
        device = self.normalization_v2.device
        self.z_encoder = self._make_encoder(self._encoder_inputs()).to(device)

    # ------------------------------------------------------------------ inputs
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict:
        x = self.select_peaks(tensors[REGISTRY_KEYS.X_KEY])
        return {MODULE_KEYS.X_KEY: x, **self.covariates(tensors)}

    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict
    ) -> dict:
        return {
            MODULE_KEYS.Z_KEY: inference_outputs[MODULE_KEYS.Z_KEY],
            MODULE_KEYS.LIBRARY_KEY: inference_outputs.get(MODULE_KEYS.LIBRARY_KEY),
            **self.covariates(tensors),
        }

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

        The binarized minibatch (in the layout it came in: dense, or sparse CSR) is returned
        under ``"x_binarized"`` for the loss to reuse, and the depth offset of each cell
        under ``"library"``.
        """
        x = binarize(x)
        cats, cont = self._encoder_covariates(batch_index, cat_covs, cont_covs)
        library = self.depth_logit_offset(x)
        h = x if self.lsi is None else self.lsi(x)
        qz_m, qz_v = self.z_encoder(h, *cats, cont=cont)
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
            MODULE_KEYS.X_BINARIZED_KEY: x,
        }

    def _decode(self, z, library, cats: list, cont) -> dict[str, torch.Tensor]:
        """The decoder's output ``eta`` of every peak (key ``"px"``: Bernoulli logits for
        ``atac_link="logit"``); with ``library`` (the depth offset of
        :meth:`depth_logit_offset`) that of a cell of that depth."""
        logits = self.decoder(z, *cats, cont=cont)
        offset = library if library is not None else 0.0
        if isinstance(offset, torch.Tensor):
            # in place: one pass less over the (B, P) logits; nothing saved them for backward
            logits = logits.add_(offset) if logits.dtype == offset.dtype else logits + offset
        return {MODULE_KEYS.PX_KEY: logits}

    def _log_likelihood_fn(self, x: torch.Tensor, tensors: dict[str, torch.Tensor]):
        cats, cont = self._decoder_covariates(tensors, x.device)
        offset = self.depth_logit_offset(x)

        def log_likelihood(z: torch.Tensor) -> torch.Tensor:
            return self.atac_log_likelihood(self.decoder(z, *cats, cont=cont) + offset, x)

        return log_likelihood

    # ------------------------------------------------------------------ interface
    @classmethod
    def input_arguments(
        cls, n_features: Mapping[str, int], modality_flags: Sequence | None = None
    ) -> dict:
        """Constructor arguments for the registered features: ``n_input`` peaks."""
        return {"n_input": n_features[ATAC]}

    def registry_key(self, modality: str) -> str:
        """Registry key of the peak matrix (``modality="atac"``)."""
        self.check_modality(modality)
        return REGISTRY_KEYS.X_KEY

    def init_from_data(self, matrices: Mapping[str, object]) -> None:
        """Decoder bias ``link(open fraction)`` of each peak read, from ``matrices["atac"]``,
        and the encoder's LSI basis (``n_lsi``)."""
        self._init_bernoulli_decoder(self.decoder, open_fraction(matrices[ATAC]))
        if self.lsi is not None:
            index = None if self.peak_index is None else self.peak_index.cpu().numpy()
            self.lsi.fit(matrices[ATAC], peak_index=index)

    def _joint_moments(self, inference_outputs: Mapping, joint_mean: str):
        return inference_outputs[MODULE_KEYS.QZM_KEY], inference_outputs[MODULE_KEYS.QZV_KEY]

    def _expert_moments(self, inference_outputs: Mapping, modality: str):
        return self._joint_moments(inference_outputs, "mixture")  # the one modality

    def aggregate_posterior_components(
        self, inference_outputs: Mapping
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of each cell's ``q(z|x)``."""
        return self._joint_moments(inference_outputs, "mixture")

    def _normalized_output(self, generative_outputs: Mapping, modality: str) -> torch.Tensor:
        return self.open_probability(generative_outputs[MODULE_KEYS.PX_KEY])

    def _loss(self, tensors, inference_outputs, generative_outputs, kl_weight, objective):
        """``reconstruction_loss`` and ``kl_local`` sum to the negative ELBO (``"elbo"``) or
        to the negative importance-weighted bound (``"iwae"``, ``"dreg"``; there
        ``reconstruction_loss`` is ``-log p(x|z_k)`` averaged over the particles and
        ``kl_local`` the rest). Both are the true, unweighted quantities even while
        ``kl_weight < 1``; only ``loss`` uses ``kl_weight``."""
        qz_m = inference_outputs[MODULE_KEYS.QZM_KEY]
        qz_v = inference_outputs[MODULE_KEYS.QZV_KEY]
        x = inference_outputs.get(MODULE_KEYS.X_BINARIZED_KEY)
        if x is None:
            x = binarize(self.select_peaks(tensors[REGISTRY_KEYS.X_KEY].to(qz_m.device)))

        if objective == "elbo":
            z = inference_outputs[MODULE_KEYS.Z_KEY]
            logits = generative_outputs[MODULE_KEYS.PX_KEY]
            reconst = -self.atac_log_likelihood(logits, x)
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

    def _log_marginal(
        self, tensors, inference_outputs, n_particles: int, chunk_size: int | None
    ) -> torch.Tensor:
        log_w, _ = importance_log_weights(
            self._log_likelihood_fn(inference_outputs[MODULE_KEYS.X_BINARIZED_KEY], tensors),
            self.prior,
            inference_outputs[MODULE_KEYS.QZM_KEY],
            inference_outputs[MODULE_KEYS.QZV_KEY],
            n_particles=n_particles,
            chunk_size=chunk_size,
        )
        return log_mean_exp(log_w, dim=0)
