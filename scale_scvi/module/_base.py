"""What SCALE's modules share, and the interface the model reads them through."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data

from ._components import (
    DEFAULT_N_HIDDEN,
    SCALEDecoder,
    SCALEEncoder,
    SparseFirstLayer,
    select_columns,
)
from ._constants import ATAC, JOINT, MODULE_KEYS, Modality
from ._objectives import atac_log_likelihood, inverse_link, open_probability
from ._prior import GaussianMixturePrior

Objective = Literal["elbo", "iwae", "dreg"]
OBJECTIVES = ("elbo", "iwae", "dreg")
Normalization = Literal["encoder", "decoder", "none", "both"]

#: The links of the ATAC likelihood: ``p = sigmoid(eta)`` (SCALE's) or ``1 - exp(-exp(eta))``.
AtacLink = Literal["logit", "cloglog"]
ATAC_LINKS = ("logit", "cloglog")


def check_atac_link(link: str) -> None:
    """Raise a ``ValueError`` unless ``link`` is one of :data:`ATAC_LINKS`."""
    if link not in ATAC_LINKS:
        raise ValueError(f"atac_link must be 'logit' or 'cloglog', got {link!r}.")


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

    Models saved before batch norm became the encoders' default (version 0.1.0) have no
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


def log_depth(x: torch.Tensor) -> torch.Tensor:
    """``log`` of the number of open peaks of each cell (at least 1), shape ``(B,)``.

    ``x`` is the binarized minibatch, dense or sparse CSR (one stored value per open peak).
    """
    if x.layout == torch.strided:
        depth = x.sum(-1)
    else:
        depth = torch.diff(x.crow_indices()).to(torch.float32)
    return depth.clamp_min(1.0).log()


class SCALEModuleBase(BaseModuleClass):
    """Base of SCALE's modules: the shared prior, covariates, depth offset and checkpoints.

    A module computes with a Gaussian-mixture prior ``p(z) = sum_c pi_c N(mu_c, sigma2_c)``
    (:attr:`prior`) shared by all its modalities, binarized ATAC under a Bernoulli likelihood
    (dense or sparse CSR minibatches alike), and the covariates of scvi-tools' registry.

    The model (:class:`~scale_scvi.SCALE`) reads every module through this interface and
    never asks which module it has:

    - :attr:`modalities`: the modalities the module models (``"atac"``, ``"rna"``);
    - :meth:`input_arguments`: its constructor arguments for the registered data;
    - :meth:`registry_key`: the registry key of each modality's matrix;
    - :meth:`init_from_data`: start the decoders at the data's average cell;
    - :meth:`latent_moments` / :meth:`latent_sample`: the posterior of all modalities
      (``"joint"``) or of one;
    - :meth:`posterior_cluster_probabilities`: ``q(c | x)`` from that posterior;
    - :meth:`aggregate_posterior_components`: the Gaussians whose mixture over cells is the
      aggregate posterior (the GMM initialization is fitted to them);
    - :meth:`decode`: a modality's expected normalized output at ``z`` (peak probabilities,
      gene proportions), and :meth:`observed_library`;
    - :meth:`in_place_layers`: layers that write their gradients themselves, for the
      optimizer;
    - ``loss`` (``objective`` override, ``kl_weight``) and ``marginal_ll``.

    Parameters
    ----------
    n_batch
        Number of batches (0 or 1: none).
    n_centroids
        Number of mixture components ``K`` of the prior.
    n_latent
        Latent dimensionality ``D``.
    n_hidden
        Hidden-layer widths of each encoder.
    n_hidden_decoder
        Hidden-layer widths of each decoder; ``()`` gives SCALE's linear decoders.
    n_continuous_cov
        Number of continuous covariates.
    n_cats_per_cov
        Number of categories of each extra categorical covariate.
    dropout_rate
        Dropout in the encoders.
    use_batch_norm
        Batch normalization of the hidden layers in ``"encoder"`` (default here and in
        :class:`MultiSCALEVAE`), ``"decoder"``, ``"both"`` or ``"none"``. Without any
        normalization, most of the encoder's ReLU units stop responding to any cell during
        training and the clustering is worse (measured in ``benchmarks/NOTES.md``).
        ``"none"`` (with no layer norm) is the original SCALE's encoder.
        :class:`SCALEVAE` has its own default, layer norm in the encoder.
    use_layer_norm
        Layer normalization, in ``"encoder"``, ``"decoder"``, ``"both"`` or ``"none"``.
    encode_covariates
        Give the covariates to the encoders too (they always reach the decoders).
    deeply_inject_covariates
        Inject covariates into every hidden layer of the encoders.
    objective
        ``"elbo"``, ``"iwae"`` or ``"dreg"`` (the importance-weighted bound with
        ``n_particles`` samples, with the doubly-reparameterized gradient for ``"dreg"``);
        what ``"elbo"`` computes differs between the modules (see each).
    n_particles
        Number of importance samples (per mixture component of a multimodal posterior).
    particle_chunk_size
        Particles decoded at a time in the importance-weighted objectives.
    min_var
        Variance floor of the prior components.
    depth_offset
        Add ``log(open peaks / mean open peaks)`` of each cell to its ATAC logits, so that
        sequencing depth is explained by the likelihood and not by the latent (and so not by
        the clusters). ``False`` is the original SCALE.
    atac_link
        How the ATAC decoder's output ``eta`` (plus the depth offset) becomes the probability
        that a peak is open: ``"logit"``, ``sigmoid(eta)``, the original SCALE's (the
        default here and in the multimodal module); or ``"cloglog"``, ``1 - exp(-exp(eta))``,
        the probability that at least one fragment falls in the peak when fragments are
        Poisson with rate ``exp(eta)`` (the default of :class:`~scale_scvi.module.SCALEVAE`):
        the depth then multiplies the rate, and a peak open in nearly every cell of a type
        stays so at any depth. Measured in ``benchmarks/NOTES.md`` ("The link of the ATAC
        likelihood" and "The default path at 6,000-10,000 cells made from real ones"): on
        the labeled sets as shipped (600 and 1,043 cells) less of the depth left in the
        latent and the clusters within their seed-to-seed spread; on sets of 6,000-10,000
        cells made from their cells, and on a simulated set of 10,000, the logit cuts types
        in two by depth and the complementary log-log keeps them whole.
    """

    #: The modalities the module models; set by each subclass.
    modalities: tuple[str, ...] = ()

    def __init__(
        self,
        n_batch: int = 0,
        n_centroids: int = 30,
        n_latent: int = 10,
        n_hidden: Sequence[int] = DEFAULT_N_HIDDEN,
        n_hidden_decoder: Sequence[int] = (),
        n_continuous_cov: int = 0,
        n_cats_per_cov: Iterable[int] | None = None,
        dropout_rate: float = 0.0,
        use_batch_norm: Normalization = "encoder",
        use_layer_norm: Normalization = "none",
        encode_covariates: bool = True,
        deeply_inject_covariates: bool = False,
        objective: Objective = "elbo",
        n_particles: int = 1,
        particle_chunk_size: int | None = 16,
        min_var: float = 1e-4,
        depth_offset: bool = True,
        atac_link: AtacLink = "logit",
    ):
        super().__init__()
        validate_objective(objective, n_particles, particle_chunk_size)
        check_atac_link(atac_link)
        self.n_batch = n_batch
        self.n_centroids = n_centroids
        self.n_latent = n_latent
        self.n_continuous_cov = n_continuous_cov
        self.cat_list = [n_batch] + list(n_cats_per_cov or [])
        self.encode_covariates = encode_covariates
        self.n_hidden = tuple(n_hidden)
        self.n_hidden_decoder = tuple(n_hidden_decoder)
        self.dropout_rate = dropout_rate
        self.use_batch_norm = use_batch_norm
        self.use_layer_norm = use_layer_norm
        self.deeply_inject_covariates = deeply_inject_covariates
        self.objective = objective
        self.n_particles = n_particles
        self.particle_chunk_size = particle_chunk_size
        self.depth_offset = depth_offset
        # log of the mean number of open peaks per cell: the reference of the depth offset
        self.register_buffer("log_mean_depth", torch.zeros(()))
        self.min_var = min_var
        # The link saved with the weights (state dicts saved before it existed: the logit).
        # The string is kept beside the buffer, in step with it on loading, so that the
        # likelihood of every minibatch does not read a device tensor back to the host.
        self.atac_link = atac_link
        self.register_buffer("atac_link_cloglog", torch.tensor(atac_link == "cloglog"))

    def _add_prior(self) -> None:
        """Create the prior; subclasses call it after their networks, so that the networks
        draw their random initial weights in the same order as in earlier versions."""
        self.prior = GaussianMixturePrior(self.n_centroids, self.n_latent, min_var=self.min_var)

    # ------------------------------------------------------------------ networks
    def _make_encoder(self, n_input: int, input_dropout: float = 0.0) -> SCALEEncoder:
        """An encoder ``x -> q(z|x)`` of ``n_input`` features with the module's covariates."""
        return SCALEEncoder(
            n_input=n_input,
            n_output=self.n_latent,
            n_hidden=self.n_hidden,
            n_cat_list=self.cat_list if self.encode_covariates else None,
            n_cont=self.n_continuous_cov if self.encode_covariates else 0,
            dropout_rate=self.dropout_rate,
            use_batch_norm=self.use_batch_norm in ("encoder", "both"),
            use_layer_norm=self.use_layer_norm in ("encoder", "both"),
            deep_inject_covariates=self.deeply_inject_covariates,
            input_dropout=input_dropout,
        )

    def _make_decoder(self, n_output: int) -> SCALEDecoder:
        """A decoder ``z -> n_output`` values with the module's covariates."""
        return SCALEDecoder(
            n_input=self.n_latent,
            n_output=n_output,
            n_hidden=self.n_hidden_decoder,
            n_cat_list=self.cat_list,
            n_cont=self.n_continuous_cov,
            use_batch_norm=self.use_batch_norm in ("decoder", "both"),
            use_layer_norm=self.use_layer_norm in ("decoder", "both"),
        )

    def in_place_layers(self) -> list[SparseFirstLayer]:
        """The encoders' sparse first layers (they write their weight gradients in place)."""
        return [m.first_layer for m in self.modules() if isinstance(m, SCALEEncoder)]

    def separately_clipped_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters whose gradient norm the optimizer clips apart from the rest
        (:class:`~scale_scvi.train.FusedAdamW`'s ``clip_apart``): none here; a multimodal
        module returns the networks of a switched-off modality."""
        return []

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        allow_missing_depth_offset(self, state_dict, prefix)
        allow_missing_batch_norm(self, state_dict, prefix)
        self._load_atac_link(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _load_atac_link(self, state_dict: dict, prefix: str) -> None:
        """Take the ATAC link the weights were trained with: the state dict's
        ``atac_link_cloglog``, or the logit for a state dict saved before the link could be
        chosen (it has no such entry)."""
        key = prefix + "atac_link_cloglog"
        if key not in state_dict:
            state_dict[key] = torch.zeros_like(self.atac_link_cloglog)
        self.atac_link = "cloglog" if bool(state_dict[key]) else "logit"

    # ------------------------------------------------------------------ ATAC likelihood
    def atac_log_likelihood(self, eta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``log p(x|z)`` of the binarized peaks ``x`` under the decoder output ``eta``
        (with the depth offset), through the module's ``atac_link``; shape ``eta.shape[:-1]``."""
        return atac_log_likelihood(eta, x, self.atac_link)

    def open_probability(self, eta: torch.Tensor) -> torch.Tensor:
        """The probability that each peak is open, from the decoder output ``eta``."""
        return open_probability(eta, self.atac_link)

    def inverse_link(self, p: torch.Tensor) -> torch.Tensor:
        """The decoder output ``eta`` at which a peak is open with probability ``p``."""
        return inverse_link(p, self.atac_link)

    # ------------------------------------------------------------------ covariates
    @staticmethod
    def covariates(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """The covariates of a minibatch, under the modules' argument names."""
        return {
            MODULE_KEYS.BATCH_INDEX_KEY: tensors.get(REGISTRY_KEYS.BATCH_KEY),
            MODULE_KEYS.CONT_COVS_KEY: tensors.get(REGISTRY_KEYS.CONT_COVS_KEY),
            MODULE_KEYS.CAT_COVS_KEY: tensors.get(REGISTRY_KEYS.CAT_COVS_KEY),
        }

    @staticmethod
    def _cat_list(batch_index, cat_covs) -> list[torch.Tensor]:
        cats = [batch_index] if batch_index is not None else []
        if cat_covs is not None:
            cats += list(torch.split(cat_covs, 1, dim=1))
        return cats

    def _encoder_covariates(self, batch_index, cat_covs, cont_covs):
        """``(categorical list, continuous)`` for the encoders (none without
        ``encode_covariates``)."""
        if not self.encode_covariates:
            return [], None
        return self._cat_list(batch_index, cat_covs), cont_covs

    def _decoder_covariates(self, tensors: Mapping[str, torch.Tensor], device: torch.device):
        """``(categorical list, continuous)`` of a minibatch for the decoders, on ``device``."""
        covs = self.covariates(tensors)
        cats = self._cat_list(covs[MODULE_KEYS.BATCH_INDEX_KEY], covs[MODULE_KEYS.CAT_COVS_KEY])
        cont = covs[MODULE_KEYS.CONT_COVS_KEY]
        return [c.to(device) for c in cats], (cont.to(device) if cont is not None else None)

    # ------------------------------------------------------------------ ATAC
    def _register_peak_index(self, peak_index: Sequence[int] | None, n_input: int) -> int:
        """Keep ``peak_index`` (the columns of the peaks read) as a buffer; the number read.

        Saved with the model, so that every later use reads the same peaks; ``None``: all
        ``n_input`` peaks.
        """
        if peak_index is None:
            self.peak_index = None
            return n_input
        index = torch.as_tensor(np.asarray(peak_index), dtype=torch.int64)
        if index.ndim != 1 or not len(index):
            raise ValueError("peak_index must be a non-empty 1-d sequence of peak indices.")
        if (index.diff() <= 0).any() or index[0] < 0 or index[-1] >= n_input:
            raise ValueError(f"peak_index must be increasing column indices in [0, {n_input}).")
        self.register_buffer("peak_index", index)
        return len(index)

    def select_peaks(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """The columns of the peaks the module reads (all without ``peak_index``)."""
        return x if self.peak_index is None or x is None else select_columns(x, self.peak_index)

    def depth_logit_offset(self, x_atac: torch.Tensor | None) -> torch.Tensor | float:
        """ATAC logit offset ``log(open peaks) - log(mean open peaks)`` per cell, ``(B, 1)``.

        ``x_atac`` is the binarized minibatch (dense or CSR); ``0.0`` without it or with
        ``depth_offset=False``, i.e. the logits of a cell of the training data's mean depth.
        """
        if not self.depth_offset or x_atac is None:
            return 0.0
        return (log_depth(x_atac) - self.log_mean_depth).unsqueeze(-1)

    @torch.no_grad()
    def _init_bernoulli_decoder(self, decoder: SCALEDecoder, open_fraction) -> None:
        """Output bias ``link(open fraction)`` of each peak read (``open_fraction`` of every
        peak of the registered matrix); the mean number of open peaks read per cell becomes
        the reference of the depth offset."""
        frac = np.asarray(open_fraction, dtype=np.float64)
        if self.peak_index is not None:
            frac = frac[self.peak_index.cpu().numpy()]
        self.log_mean_depth.fill_(float(np.log(max(frac.sum(), 1.0))))
        bias = decoder.output.fc_layers[0][0].bias
        frac_t = torch.as_tensor(frac, dtype=bias.dtype, device=bias.device)
        bias.copy_(inverse_link(frac_t, self.atac_link, eps=1e-4))

    # ------------------------------------------------------------------ interface
    @classmethod
    def input_arguments(
        cls, n_features: Mapping[str, int], modality_flags: Sequence | None = None
    ) -> dict:
        """Constructor arguments that say what the module models, from the number of
        features of each registered modality (and the modality flags' categories)."""
        raise NotImplementedError

    def registry_key(self, modality: str) -> str:
        """Registry key of the matrix of ``modality``."""
        raise NotImplementedError

    def init_from_data(self, matrices: Mapping[str, object]) -> None:
        """Start the decoders at the data's average cell, given each modality's matrix.

        So that training does not spend its first hundreds of steps learning the overall
        sparsity of the data.
        """
        raise NotImplementedError

    def prepare_query_encoders(self, n_reference_batches: int, adapt: bool) -> None:
        """Set up the encoders of a query model (scArches' query mapping, after the
        reference's weights are loaded).

        The query's batches start with the weights of the reference's average batch
        (:meth:`SCALEEncoder.start_new_batches`). Unless ``adapt``, the encoders are then
        frozen: query training fits only the decoders' columns of the query's batches, and
        a query cell's latent is the reference encoder's (measured in
        ``benchmarks/NOTES.md``, "Reference mapping: the query is encoded by the
        reference's encoder").
        """
        for module in self.modules():
            if isinstance(module, SCALEEncoder):
                module.start_new_batches(n_reference_batches)
                if not adapt:
                    module.requires_grad_(False)

    def check_modality(self, modality: str) -> None:
        """Raise a ``ValueError`` unless ``modality`` is ``"joint"`` or one the module has."""
        if modality != JOINT and modality not in self.modalities:
            choices = ", ".join(repr(m) for m in (JOINT, *self.modalities))
            raise ValueError(
                f"modality={modality!r} is not a modality of this model ({choices}); a model "
                "of RNA and ATAC is set up with SCALE.setup_mudata."
            )

    def latent_moments(
        self,
        inference_outputs: Mapping,
        modality: Modality = "joint",
        joint_mean: Literal["mixture", "precision"] = "mixture",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of the posterior of all modalities (``"joint"``) or of one.

        ``joint_mean`` chooses the summary of a posterior over several modalities:
        ``"mixture"``, its own moments, or ``"precision"``, those of the normalized product
        of the experts (see :class:`~scale_scvi.module.MultiSCALEVAE`); with one modality
        both are the same.
        """
        self.check_modality(modality)
        if joint_mean not in ("mixture", "precision"):
            raise ValueError(
                f"joint_mean={joint_mean!r} is not one of 'mixture' (the mixture of experts' "
                "mean) and 'precision' (the precision-weighted product of the experts)."
            )
        if modality == JOINT:
            return self._joint_moments(inference_outputs, joint_mean)
        return self._expert_moments(inference_outputs, modality)

    def _joint_moments(self, inference_outputs: Mapping, joint_mean: str):
        """Moments of the posterior of all modalities (see :meth:`latent_moments`)."""
        raise NotImplementedError

    def _expert_moments(self, inference_outputs: Mapping, modality: str):
        """Moments of one modality's posterior (see :meth:`latent_moments`)."""
        raise NotImplementedError

    def latent_sample(self, inference_outputs: Mapping, modality: Modality = "joint"):
        """One sample of that posterior per cell, drawn anew at every call (averages over
        several calls are Monte-Carlo averages over the posterior). Here a draw of the
        Gaussian with the moments of :meth:`latent_moments`; a module whose joint posterior
        is a mixture overrides this."""
        qz_m, qz_v = self.latent_moments(inference_outputs, modality)
        return qz_m + qz_v.sqrt() * torch.randn_like(qz_m)

    def cluster_probabilities(self, qz_m: torch.Tensor) -> torch.Tensor:
        """``p(c | z)`` at a posterior mean, shape ``(B, K)``."""
        return self.prior.responsibilities(qz_m)

    def posterior_cluster_probabilities(
        self, inference_outputs: Mapping, modality: Modality = "joint"
    ) -> torch.Tensor:
        """``q(c | x)``: ``p(c | z)`` at the mean of that posterior, shape ``(B, K)``."""
        return self.cluster_probabilities(self.latent_moments(inference_outputs, modality)[0])

    def aggregate_posterior_components(
        self, inference_outputs: Mapping
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Means and variances (``(N, D)``) of the Gaussians of the aggregate posterior."""
        raise NotImplementedError

    def aggregate_posterior_weights(self, inference_outputs: Mapping) -> torch.Tensor:
        """Weight of each row of :meth:`aggregate_posterior_components`: its weight in its
        cell's posterior mixture, so that every cell counts once (all 1 with one row per
        cell)."""
        qz_m, _ = self.aggregate_posterior_components(inference_outputs)
        return torch.ones(qz_m.shape[0], device=qz_m.device)

    def decode(
        self,
        z: torch.Tensor,
        modality: str,
        batch_index: torch.Tensor | None = None,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Expected normalized output of ``modality`` at ``z``: the probability that each
        peak is open (``"atac"``, for a cell of the mean depth), or each gene's share of the
        counts (``"rna"``)."""
        if modality not in self.modalities:
            self.check_modality(modality)
            raise ValueError(f"modality={modality!r}: decode one modality, not the joint one.")
        out = self.generative(z, batch_index=batch_index, cont_covs=cont_covs, cat_covs=cat_covs)
        return self._normalized_output(out, modality)

    def _normalized_output(self, generative_outputs: Mapping, modality: str) -> torch.Tensor:
        """The normalized output of ``modality`` among the generative outputs."""
        raise NotImplementedError

    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
    ) -> dict:
        """Decode ``z`` (``(..., B, D)``) into the parameters of each modality's likelihood.

        ATAC: Bernoulli logits of every peak under ``"px"``, those of a cell of depth
        ``library`` (see the subclass) or, without it, of the training data's mean depth.
        RNA: gene proportions under ``"px_rna_scale"`` and, with the library size, the
        negative binomial under ``"px_rna"``.
        """
        return self._decode(z, library, self._cat_list(batch_index, cat_covs), cont_covs)

    def _decode(self, z, library, cats: list, cont) -> dict:
        """:meth:`generative` with the categorical covariates as a list."""
        raise NotImplementedError

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
        objective: Objective | None = None,
    ) -> LossOutput:
        """The negative training objective, averaged over the minibatch.

        ``reconstruction_loss`` and ``kl_local`` are per cell and sum to the negative bound
        (what each is for each objective: see the subclass).

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
        return self._loss(tensors, inference_outputs, generative_outputs, kl_weight, objective)

    def _loss(self, tensors, inference_outputs, generative_outputs, kl_weight, objective):
        """:meth:`loss` for a validated ``objective``."""
        raise NotImplementedError

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
        converges to ``log p(x)``; with ``K = 1`` it is a one-sample ELBO. For a posterior
        over several modalities, ``K`` particles are drawn from each mixture component the
        cell has (stratified), and the likelihood is that of the unweighted model
        (``likelihood_scale`` is ignored). Decoding runs ``n_mc_samples_per_pass`` particles
        at a time, so memory does not grow with ``K``.

        Parameters
        ----------
        tensors
            A minibatch from the model's data loader.
        n_mc_samples
            Number of importance samples ``K`` (per mixture component).
        return_mean
            Return the mean over the minibatch instead of one value per cell.
        n_mc_samples_per_pass
            Samples decoded at a time (memory); defaults to ``particle_chunk_size``.

        Returns
        -------
        ``log p(x)`` estimates of shape ``(B,)``, or their mean as a float.
        """
        inference_outputs = self.inference(**self._get_inference_input(tensors))
        log_px = self._log_marginal(
            tensors,
            inference_outputs,
            n_mc_samples,
            n_mc_samples_per_pass or self.particle_chunk_size,
        )
        return log_px.mean().item() if return_mean else log_px

    def _log_marginal(
        self, tensors, inference_outputs, n_particles: int, chunk_size: int | None
    ) -> torch.Tensor:
        """The per-cell estimate of :meth:`marginal_ll`, shape ``(B,)``."""
        raise NotImplementedError

    def observed_library(self, tensors: Mapping[str, torch.Tensor], modality: str):
        """Each cell's total of ``modality``'s matrix, shape ``(B, 1)``."""
        x = tensors[self.registry_key(modality)]
        if modality == ATAC:
            x = self.select_peaks(x)
        x = x if x.layout == torch.strided else x.to_dense()
        return x.sum(-1, keepdim=True)
