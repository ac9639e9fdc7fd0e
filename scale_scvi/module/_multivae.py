"""MultiSCALEVAE: multimodal SCALE with a mixture-of-experts posterior and a shared GMM prior."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from scvi.distributions import NegativeBinomial
from scvi.module.base import LossOutput, auto_move_data
from torch import nn
from torch.distributions import Normal

from ._base import SCALEModuleBase
from ._components import binarize, csr_row_indices
from ._constants import (
    ATAC,
    ATAC_KEY,
    JOINT,
    MODALITIES,
    MODALITY_FLAG_KEY,
    MODULE_KEYS,
    RNA,
    RNA_KEY,
    Modality,
    expert_keys,
)
from ._feature_stats import mean_proportion, open_fraction
from ._objectives import (
    mixture_log_weights,
    moe_elbo_bound,
    moe_importance_log_weights,
    moe_iwae_bound,
)

Posterior = Literal["moe", "mopoe"]
MixtureWeights = Literal["equal", "learned"]
K = MODULE_KEYS
#: Defaults of :meth:`MultiSCALEVAE.select_experts_on`: the z-score its evidence needs, and
#: the gain in nats per cell that keeps the expert of a modality the latent explains.
EXPERT_Z_THRESHOLD = 2.0
EXPERT_MIN_GAIN = 1.0


def _dense(x: torch.Tensor) -> torch.Tensor:
    return x if x.layout == torch.strided else x.to_dense()


def _row_has_data(x: torch.Tensor) -> torch.Tensor:
    """``True`` for rows with at least one non-zero value (sparse or dense input)."""
    if x.layout == torch.strided:
        return (x != 0).any(-1)
    x = x.to_sparse_csr() if x.layout != torch.sparse_csr else x
    rows = csr_row_indices(x)
    nonzero = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    return nonzero.index_put_((rows,), x.values() != 0, accumulate=True)


def product_of_experts(
    qz_ms: torch.Tensor, qz_vs: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the normalized product of the Gaussians a cell has.

    ``v = 1 / sum_m (1 / v_m)`` and ``mu = v * sum_m mu_m / v_m`` over the rows of
    ``qz_ms``/``qz_vs`` (shape ``(M, B, D)``) that ``mask`` (``(M, B)``) marks present.
    """
    mask = mask.to(qz_ms.dtype).unsqueeze(-1)
    precision = (mask / qz_vs).sum(0)
    return (mask * qz_ms / qz_vs).sum(0) / precision, 1.0 / precision


def sample_mixture(
    comp_ms: torch.Tensor,
    comp_vs: torch.Tensor,
    weights: torch.Tensor,
    shape: tuple[int, ...] = (),
) -> torch.Tensor:
    """Samples of each cell's mixture of Gaussians: a component picked per cell with its
    weight, then a draw of that component.

    ``comp_ms``, ``comp_vs``: ``(C, B, D)``; ``weights``: ``(C, B)``, each column summing to
    one (zero for a component the cell lacks). Returns ``(*shape, B, D)``.
    """
    component = torch.distributions.Categorical(probs=weights.t()).sample(shape)  # (*S, B)
    eps = torch.randn((*shape, *comp_ms.shape), dtype=comp_ms.dtype, device=comp_ms.device)
    z_all = comp_ms + comp_vs.sqrt() * eps  # (*S, C, B, D)
    pick = nn.functional.one_hot(component, comp_ms.shape[0]).movedim(-1, -2)
    return (pick.to(comp_ms.dtype).unsqueeze(-1) * z_all).sum(-3)


class MultiSCALEVAE(SCALEModuleBase):
    """SCALE for paired single-cell RNA and ATAC: a mixture-of-experts VAE with a GMM prior.

    Generative model, shared by the modalities: ``c ~ Cat(pi)``,
    ``z | c ~ N(mu_c, diag(sigma2_c))``; then ``x_atac,p | z ~ Bernoulli(sigmoid(f(z))_p)``
    on binarized peaks and ``x_rna,g | z ~ NB(l * softmax(h(z))_g, theta_g)`` with the
    observed library size ``l`` and gene-wise dispersion ``theta``.

    Inference, in the manner of MMVAE (Shi et al., NeurIPS 2019): one Gaussian encoder
    ``q(z|x_m)`` per modality and the mixture of experts
    ``q(z|x_1..M) = sum_m alpha_m q(z|x_m)`` (weights ``1/M`` with
    ``mixture_weights="equal"``; by default learned, see below). The objective draws ``K``
    particles from every expert (stratified sampling), weights each by
    ``log p(x_1..M|z) + log p(z) - log q(z|x_1..M)`` with the exact mixture densities, and
    combines them by their weighted mean (``"elbo"``) or in the stratified importance-weighted
    bound ``log sum_m alpha_m (1/K) sum_k w_mk`` (``"iwae"``, ``"dreg"``; the latter with
    unbiased doubly-reparameterized gradients for a mixture, ``docs/math.md`` section 8).

    With ``posterior="mopoe"`` (the default) the mixture has one more component, the
    normalized product of the experts (a mixture of products of experts over the subsets of
    the modalities, Sutter et al., ICLR 2021): ``q = a_atac q(z|x_atac) + a_rna q(z|x_rna) +
    a_prod q(z|x_atac) q(z|x_rna) / Z`` for a paired cell. Its particles are weighted by the
    same mixture density, so the objective trains the product to explain both modalities at
    once, as well as each expert to explain both from its modality alone. With learned
    weights (the default) the mixture leans on the product where both modalities inform it
    and on one expert where the other carries no signal (``benchmarks/multiome_heldout.md``;
    ``posterior="moe"`` with learned weights collapses onto one expert, and with equal
    weights an uninformative expert drags the joint latent).

    Learned weights follow how well each component explains the training cells, which an
    encoder of a modality without signal can do by heart (a few open peaks are a fingerprint
    of a cell). So training checks the experts once on held-out cells
    (:meth:`select_experts_on`; ``select_experts``, on by default) and leaves out of the
    posterior a modality whose expert makes the product explain them worse and whose own
    data the latent does not explain on them (its likelihood stays), training again from the
    start without it.

    A cell that lacks a modality (all zeros in it, or flagged through ``modality_flags``) is
    modelled by the modalities it has: its mixture and its likelihood leave the missing one
    out (and a product needs two experts it has).

    With a single modality the mixture has one expert and the model is a GMM-prior VAE of
    that modality.

    Parameters
    ----------
    n_input_atac
        Number of peaks (0: no ATAC modality).
    n_input_rna
        Number of genes (0: no RNA modality).
    posterior
        ``"moe"``: the mixture of the unimodal experts (MMVAE); ``"mopoe"`` (``None``, the
        default): that mixture and the experts' product as one more component (MoPoE). The
        same with one modality.
    mixture_weights
        ``"equal"``: every component a cell has weighs the same in its mixture;
        ``"learned"`` (``None``, the default): the weights are parameters (one per
        component, renormalized over the components each cell has), trained with the bound,
        so that the mixture can lean on the component whose particles explain both
        modalities best. With one modality there is one component, and nothing to weigh.
    likelihood_scale
        Weight of each modality's log-likelihood in the training objective, e.g.
        ``{"atac": 5.0}`` to let ATAC count more against RNA's larger likelihood. Omitted
        modalities weigh 1. The marginal likelihood is always that of the unweighted model.
    input_dropout
        Probability with which each input value of a modality's encoder is zeroed in training,
        e.g. ``{"atac": 0.5}``; omitted modalities (and ``None``, the default) get none. A
        sparse ATAC profile with few open peaks per cell is close to a fingerprint of the
        cell, and its encoder can learn the training cells' latents by heart instead of a map
        that holds for new cells; dropping open peaks in each pass is a regularizer against
        that (measured in ``benchmarks/RESULTS.md``).
    select_experts
        ``True``: let :meth:`~scale_scvi.model.SCALE.train` leave out of the posterior a
        modality whose encoder does not help explain cells held out from training (checked
        once, at the end of the KL warm-up, by :meth:`select_experts_on`; see
        :attr:`expert_active`). When the check leaves an expert out, training starts again
        from the module's initial weights and random state with that expert off (the model
        that has the expert off from the first step), so that nothing the expert taught the
        latent during the warm-up remains (the warm-up is then trained twice: a
        quarter more epochs by default). The modality's likelihood stays in the objective
        and its decoder learns, but it does not move the latent of cells that have another
        modality (its gradient stops at ``z``): the latent is shaped by the modalities whose
        experts generalize, and the other is predicted from it. Its networks are clipped
        apart from the rest (:meth:`separately_clipped_parameters`), and the mixture
        components no cell uses are left out, so that on paired cells whose ATAC expert is
        left out the latent is, to the bit, that of the RNA-only model of the same seed.
        Training warns when the check leaves an expert out: a warm-up much shorter than the
        default can end before the latent has learned a modality that does inform it
        (``benchmarks/multiome_heldout.md``). ``True`` is the default; ``False`` keeps every
        expert (measurements in ``benchmarks/RESULTS.md`` and ``docs/math.md`` section 8).
    modality_flags
        One row per category of the registered modality flag: which of ``(atac, rna)``
        a cell of that category has. ``None`` when no flag is registered.
    peak_index
        The ATAC peaks the module reads (sorted column indices of the registered peak
        matrix); every minibatch is cut to them and the ATAC networks see only those.
        ``None`` (default): every peak.
    **kwargs
        The arguments of :class:`~scale_scvi.module.SCALEModuleBase` (``n_centroids``,
        ``n_latent``, networks, covariates, ``objective``, ...). Here ``objective="elbo"``
        is the stratified Monte-Carlo ELBO with the exact mixture prior (``n_particles``
        per component), not :class:`~scale_scvi.module.SCALEVAE`'s closed form: their values
        are not comparable.
    """

    def __init__(
        self,
        n_input_atac: int = 0,
        n_input_rna: int = 0,
        posterior: Posterior | None = None,
        mixture_weights: MixtureWeights | None = None,
        likelihood_scale: Mapping[str, float] | None = None,
        input_dropout: Mapping[str, float] | None = None,
        select_experts: bool = True,
        modality_flags: Sequence[Sequence[bool]] | None = None,
        peak_index: Sequence[int] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # None: the default. Remembered so that a module state saved when the defaults were
        # the mixture of experts with equal weights still loads (see load_state_dict).
        self._default_posterior, self._default_weights = posterior is None, mixture_weights is None
        posterior = "mopoe" if posterior is None else posterior
        mixture_weights = "learned" if mixture_weights is None else mixture_weights
        if n_input_atac < 0 or n_input_rna < 0 or n_input_atac + n_input_rna == 0:
            raise ValueError(
                "MultiSCALEVAE needs at least one modality: set n_input_atac and/or n_input_rna "
                f"to the number of features (got {n_input_atac} and {n_input_rna})."
            )
        likelihood_scale = dict(likelihood_scale or {})
        unknown = set(likelihood_scale) - set(MODALITIES)
        if unknown:
            raise ValueError(
                f"likelihood_scale has unknown modalities {sorted(unknown)}; use keys "
                f"{MODALITIES}."
            )
        if any(float(v) <= 0 for v in likelihood_scale.values()):
            raise ValueError(f"likelihood_scale values must be positive, got {likelihood_scale}.")
        if posterior not in ("moe", "mopoe"):
            raise ValueError(
                f"posterior={posterior!r} is not one of 'moe' (mixture of experts) and 'mopoe' "
                "(mixture of the experts and their product)."
            )
        if mixture_weights not in ("equal", "learned"):
            raise ValueError(
                f"mixture_weights={mixture_weights!r} is not one of 'equal' and 'learned'."
            )
        input_dropout = dict(input_dropout or {})
        unknown = set(input_dropout) - set(MODALITIES)
        if unknown:
            raise ValueError(
                f"input_dropout has unknown modalities {sorted(unknown)}; use keys {MODALITIES}."
            )
        if any(not 0.0 <= float(v) < 1.0 for v in input_dropout.values()):
            raise ValueError(f"input_dropout values must be in [0, 1), got {input_dropout}.")

        self.n_input_atac = n_input_atac
        self.n_input_rna = n_input_rna
        self.modalities = tuple(
            m for m, n in zip(MODALITIES, (n_input_atac, n_input_rna), strict=True) if n > 0
        )
        self.posterior = posterior
        self.likelihood_scale = {m: float(likelihood_scale.get(m, 1.0)) for m in self.modalities}
        self.select_experts = bool(select_experts) and len(self.modalities) > 1
        #: Which modalities' experts the posterior uses (one flag per modality, in the order
        #: of :attr:`modalities`). All on until the held-out check of
        #: :meth:`select_experts_on` switches one off; a switched-off modality is still
        #: modelled (its likelihood is in the objective) but no longer encoded into the
        #: latent, except for cells that have no other modality.
        self.register_buffer("expert_active", torch.ones(len(self.modalities), dtype=torch.bool))
        # experts_all_on's host copy, keyed by the buffer's storage and version counter
        self._experts_all_on: tuple[tuple[int, int], bool] | None = None

        if modality_flags is None:
            flags = torch.ones((1, len(MODALITIES)), dtype=torch.bool)
        else:
            flags = torch.as_tensor(modality_flags, dtype=torch.bool).reshape(-1, len(MODALITIES))
        self.register_buffer("modality_flags", flags)

        if peak_index is not None and ATAC not in self.modalities:
            raise ValueError("peak_index selects ATAC peaks, but the module has no ATAC.")
        #: Number of peaks the ATAC encoder and decoder read (0 without ATAC).
        self.n_peaks = self._register_peak_index(peak_index, n_input_atac)
        n_inputs = {ATAC: self.n_peaks, RNA: n_input_rna}
        self.encoders = nn.ModuleDict()
        self.decoders = nn.ModuleDict()
        # Each modality's networks draw their initial weights from a stream of their own,
        # seeded by one draw of torch's generator: a modality starts at the same weights
        # whichever other modalities the module has, and the global stream moves by that one
        # draw. So the RNA side of a joint model starts where an RNA-only model of the same
        # seed starts, and (with the unused mixture components left out, see inference) a
        # joint model whose held-out check leaves the ATAC expert out trains its latent
        # exactly as that model does.
        base_seed = int(torch.randint(2**31 - 1, (), dtype=torch.int64))
        for m in self.modalities:
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(base_seed + MODALITIES.index(m))
                self.encoders[m] = self._make_encoder(n_inputs[m], input_dropout.get(m, 0.0))
                self.decoders[m] = self._make_decoder(n_inputs[m])
                if m == RNA:
                    self.px_r = nn.Parameter(torch.randn(n_input_rna))
        self._add_prior()
        if len(self.modalities) == 1:
            mixture_weights = "equal"  # one component: nothing to weigh
        self.mixture_weights = mixture_weights
        if mixture_weights == "learned":
            n_components = len(self.modalities) + (posterior == "mopoe")
            self.component_logits = nn.Parameter(torch.zeros(n_components))

    def load_state_dict(self, state_dict: Mapping, strict: bool = True, assign: bool = False):
        """Load a module state; one saved before the current defaults loads as what it was.

        Until MoPoE with learned weights became the default, a model given neither
        ``posterior`` nor ``mixture_weights`` was the mixture of experts with equal weights,
        and its saved state has no ``component_logits``. When this module was built with the
        default weights and the state has none, the module switches to equal weights (and,
        with the default posterior, to ``"moe"``) before loading, instead of failing on the
        missing parameter.
        """
        if (
            self._default_weights
            and self.mixture_weights == "learned"
            and "component_logits" not in state_dict
            and any(k.startswith("encoders.") for k in state_dict)
        ):
            del self.component_logits
            self.mixture_weights = "equal"
            if self._default_posterior:
                self.posterior = "moe"
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # saved before the held-out check of the experts existed: every expert on
        state_dict.setdefault(prefix + "expert_active", torch.ones_like(self.expert_active))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def separately_clipped_parameters(self) -> list[nn.Parameter]:
        """The parameters of the modalities whose expert is off (:attr:`expert_active`):
        their encoder, decoder and (RNA) dispersion.

        The optimizer clips their gradient norm apart from the rest
        (:class:`~scale_scvi.train.FusedAdamW`'s ``clip_apart``): the likelihood of a
        switched-off modality does not move the latent, and its gradients then do not scale
        the steps of the networks that shape it. Empty while every expert is on.
        """
        params: list[nn.Parameter] = []
        for m, on in zip(self.modalities, self.expert_active.tolist(), strict=True):
            if not on:
                params += [*self.encoders[m].parameters(), *self.decoders[m].parameters()]
                if m == RNA:
                    params.append(self.px_r)
        return params

    @property
    def settings(self) -> dict[str, str]:
        """The posterior and mixture weights in use, as :class:`MultiSCALEVAE` arguments."""
        return {"posterior": self.posterior, "mixture_weights": self.mixture_weights}

    # ------------------------------------------------------------------ inputs
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict:
        return {
            K.X_ATAC_KEY: self.select_peaks(tensors.get(ATAC_KEY))
            if ATAC in self.modalities
            else None,
            K.X_RNA_KEY: tensors.get(RNA_KEY) if RNA in self.modalities else None,
            K.MODALITY_FLAG_KEY: tensors.get(MODALITY_FLAG_KEY),
            **self.covariates(tensors),
        }

    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict
    ) -> dict:
        library = inference_outputs.get(K.LIBRARY_KEY)
        if library is None and RNA in self.modalities:
            library = _dense(tensors[RNA_KEY]).sum(-1, keepdim=True)
        return {
            K.Z_KEY: inference_outputs[K.Z_KEY],
            K.LIBRARY_KEY: library,
            **self.covariates(tensors),
        }

    def modality_mask(
        self,
        x_atac: torch.Tensor | None,
        x_rna: torch.Tensor | None,
        modality_flag: torch.Tensor | None,
    ) -> torch.Tensor:
        """Which registered modalities each cell has, shape ``(M, B)``.

        A modality is present when the cell's row in it is not all zeros and the flag (if
        registered) does not mark it missing. A cell with no modality at all keeps every
        modality (the all-zero observation is then its data).
        """
        rows = []
        for m, x in zip(MODALITIES, (x_atac, x_rna), strict=True):
            if m not in self.modalities:
                continue
            has = _row_has_data(x)
            if modality_flag is not None:
                col = MODALITIES.index(m)
                has = has & self.modality_flags[modality_flag.reshape(-1).long(), col]
            rows.append(has)
        mask = torch.stack(rows)
        return torch.where(mask.any(0, keepdim=True), mask, torch.ones_like(mask))

    @property
    def experts_all_on(self) -> bool:
        """Whether every expert is on (:attr:`expert_active`), as a Python ``bool``.

        Read from the device only when the buffer has changed since the last read (its
        storage or its in-place version counter: the held-out check, ``load_state_dict`` and
        ``to`` all change one of them), not at every minibatch: on a GPU, reading a tensor's
        value on the host waits for every queued kernel.
        """
        buffer = self.expert_active
        if buffer.is_inference():  # made under torch.inference_mode: no version counter
            return bool(buffer.all())
        key = (buffer.data_ptr(), buffer._version)
        if self._experts_all_on is None or self._experts_all_on[0] != key:
            self._experts_all_on = (key, bool(buffer.all()))
        return self._experts_all_on[1]

    def expert_mask(self, modality_mask: torch.Tensor) -> torch.Tensor:
        """Which experts encode each cell, ``(M, B)``: the modalities it has whose expert is
        on (:attr:`expert_active`); a cell with none of those keeps every modality it has."""
        active = modality_mask & self.expert_active.unsqueeze(-1)
        return torch.where(active.any(0, keepdim=True), active, modality_mask)

    # ------------------------------------------------------------------ model
    @auto_move_data
    def inference(
        self,
        x_atac: torch.Tensor | None = None,
        x_rna: torch.Tensor | None = None,
        modality_flag: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        n_samples: int = 1,
    ) -> dict[str, torch.Tensor | Normal]:
        """Encode every modality and form the mixture-of-experts posterior.

        Returns the unimodal means and variances (``"qzm_atac"``, ``"qzv_rna"``, ... and
        stacked as ``"qzm_experts"``/``"qzv_experts"``, shape ``(M, B, D)``), the modality
        mask, the mixture's components (``"qzm_components"``, ``"qzv_components"``,
        ``"component_mask"``, ``(C, B, ...)``: the experts, and their product with
        ``posterior="mopoe"``; ``"component_log_weights"``, their log mixture weights), the
        mean and variance of the mixture (``qz_m``, ``qz_v``; ``qz`` is the Gaussian with those
        moments) and a sample ``z`` of the mixture.
        """
        cats, cont = self._encoder_covariates(batch_index, cat_covs, cont_covs)
        outputs: dict[str, torch.Tensor | Normal] = {}
        means, variances = [], []
        for m, x in zip(MODALITIES, (x_atac, x_rna), strict=True):
            if m not in self.modalities:
                continue
            if x is None:
                raise ValueError(f"The {m} matrix is missing from the minibatch.")
            h = binarize(x) if m == ATAC else torch.log1p(_dense(x))
            qz_m, qz_v = self.encoders[m](h, *cats, cont=cont)
            key_m, key_v = expert_keys(m)
            outputs[key_m], outputs[key_v] = qz_m, qz_v
            means.append(qz_m)
            variances.append(qz_v)
        qz_ms, qz_vs = torch.stack(means), torch.stack(variances)
        mask = self.modality_mask(x_atac, x_rna, modality_flag)
        experts = self.expert_mask(mask)
        comp_ms, comp_vs, comp_mask = qz_ms, qz_vs, experts
        if self.posterior == "mopoe" and len(self.modalities) > 1:
            poe_m, poe_v = product_of_experts(qz_ms, qz_vs, experts)
            comp_ms = torch.cat([qz_ms, poe_m.unsqueeze(0)])
            comp_vs = torch.cat([qz_vs, poe_v.unsqueeze(0)])
            comp_mask = torch.cat([experts, (experts.sum(0) > 1).unsqueeze(0)])
        logits = self.component_logits if self.mixture_weights == "learned" else None
        if not self.experts_all_on:
            # An expert is off: leave out the components no cell of the minibatch has (the
            # switched-off expert, and the product where it would be of one expert). They
            # weigh nothing in the bound, but their particles would be drawn and decoded. With
            # one component left, its weight is one and the learned weights are not read, so
            # the step is that of the model of the remaining modality alone.
            used = comp_mask.any(1)
            if not bool(used.all()):
                comp_ms, comp_vs, comp_mask = comp_ms[used], comp_vs[used], comp_mask[used]
                logits = logits[used] if logits is not None and comp_ms.shape[0] > 1 else None
        log_weights = mixture_log_weights(comp_mask, logits).to(comp_ms.dtype)  # (C, B)
        weights = log_weights.exp()
        w = weights.unsqueeze(-1)
        joint_m = (w * comp_ms).sum(0)
        joint_v = (w * (comp_vs + comp_ms.pow(2))).sum(0) - joint_m.pow(2)
        joint_v = joint_v.clamp_min(torch.finfo(joint_v.dtype).tiny)

        z = sample_mixture(comp_ms, comp_vs, weights, (n_samples,) if n_samples > 1 else ())

        outputs.update(
            {
                K.QZM_EXPERTS_KEY: qz_ms,
                K.QZV_EXPERTS_KEY: qz_vs,
                K.MODALITY_MASK_KEY: mask,
                K.EXPERT_MASK_KEY: experts,
                K.QZM_COMPONENTS_KEY: comp_ms,
                K.QZV_COMPONENTS_KEY: comp_vs,
                K.COMPONENT_MASK_KEY: comp_mask,
                K.COMPONENT_LOG_WEIGHTS_KEY: log_weights,
                K.QZ_KEY: Normal(joint_m, joint_v.sqrt()),
                K.QZM_KEY: joint_m,
                K.QZV_KEY: joint_v,
                K.Z_KEY: z,
            }
        )
        if x_rna is not None and RNA in self.modalities:
            outputs[K.LIBRARY_KEY] = _dense(x_rna).sum(-1, keepdim=True)
        return outputs

    def _joint_moments(self, inference_outputs: Mapping, joint_mean: str):
        """The mixture's own moments, or those of :meth:`precision_weighted_moments`."""
        if joint_mean == "precision":
            return self.precision_weighted_moments(inference_outputs)
        return inference_outputs[K.QZM_KEY], inference_outputs[K.QZV_KEY]

    def latent_sample(self, inference_outputs: Mapping, modality: Modality = "joint"):
        """One sample per cell, drawn anew at every call: for ``"joint"`` a draw of the
        mixture of experts (not of the Gaussian with its moments), else of that expert."""
        if modality != JOINT:
            return super().latent_sample(inference_outputs, modality)
        return sample_mixture(
            inference_outputs[K.QZM_COMPONENTS_KEY],
            inference_outputs[K.QZV_COMPONENTS_KEY],
            inference_outputs[K.COMPONENT_LOG_WEIGHTS_KEY].exp(),
        )

    def _expert_moments(self, inference_outputs: Mapping, modality: str):
        key_m, key_v = expert_keys(modality)
        return inference_outputs[key_m], inference_outputs[key_v]

    def precision_weighted_moments(
        self, inference_outputs: Mapping
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of the normalized product of the experts each cell has.

        ``v = 1 / sum_m (1 / v_m)`` and ``mu = v * sum_m mu_m / v_m`` over the modalities the
        cell has: where its experts agree, each weighted by its certainty. The mixture's mean
        (``qz_m``) is the plain average of the experts' means and sits between them when they
        disagree; this summary leans toward the more certain expert instead.
        """
        return product_of_experts(
            inference_outputs[K.QZM_EXPERTS_KEY],
            inference_outputs[K.QZV_EXPERTS_KEY],
            inference_outputs[K.EXPERT_MASK_KEY],
        )

    def posterior_cluster_probabilities(
        self, inference_outputs: Mapping, modality: Modality = "joint"
    ) -> torch.Tensor:
        """``q(c | x)``: of the mixture for ``"joint"`` (:meth:`joint_cluster_probabilities`),
        else ``p(c | z)`` at the mean of that modality's expert."""
        if modality == JOINT:
            return self.joint_cluster_probabilities(inference_outputs)
        return super().posterior_cluster_probabilities(inference_outputs, modality)

    def aggregate_posterior_components(
        self, inference_outputs: Mapping
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixture components of every cell (its experts, and their product with
        ``posterior="mopoe"``), one row per cell and component it has.

        Not the moments of each cell's mixture, which would blur experts that disagree into
        one wide Gaussian.
        """
        mask = inference_outputs[K.COMPONENT_MASK_KEY].bool()  # (C, B)
        return (
            inference_outputs[K.QZM_COMPONENTS_KEY][mask],
            inference_outputs[K.QZV_COMPONENTS_KEY][mask],
        )

    def aggregate_posterior_weights(self, inference_outputs: Mapping) -> torch.Tensor:
        """Each row's weight in its cell's mixture: the rows of a cell sum to one, so that
        every cell counts once, and they weigh as in the aggregate posterior
        ``sum_n q(z|x_n)`` (one over the number of components with equal weights; the
        learned weights otherwise, so that a component the mixture does not use does not
        shape the prior's fit)."""
        mask = inference_outputs[K.COMPONENT_MASK_KEY].bool()  # (C, B)
        weights = inference_outputs[K.COMPONENT_LOG_WEIGHTS_KEY].exp().to(torch.float32)
        return weights[mask]

    @classmethod
    def input_arguments(
        cls, n_features: Mapping[str, int], modality_flags: Sequence | None = None
    ) -> dict:
        """Constructor arguments for the registered features and modality flags."""
        return {
            "n_input_atac": n_features.get(ATAC, 0),
            "n_input_rna": n_features.get(RNA, 0),
            "modality_flags": modality_flags,
        }

    def registry_key(self, modality: str) -> str:
        """Registry key of a modality's matrix: RNA in ``X``, ATAC beside it."""
        self.check_modality(modality)
        return {ATAC: ATAC_KEY, RNA: RNA_KEY}[modality]

    def init_from_data(self, matrices: Mapping[str, object]) -> None:
        """Start each decoder at the data's average cell.

        The ATAC output bias becomes ``logit(open fraction)`` of each peak (and the mean
        number of open peaks per cell the reference of the ATAC depth offset); the RNA
        output bias becomes the log of each gene's mean share of the counts, so the softmax
        starts at the average profile.
        """
        if ATAC in self.modalities:
            self._init_bernoulli_decoder(self.decoders[ATAC], open_fraction(matrices[ATAC]))
        if RNA in self.modalities:
            with torch.no_grad():
                bias = self.decoders[RNA].output.fc_layers[0][0].bias
                prop = torch.as_tensor(
                    mean_proportion(matrices[RNA]), dtype=bias.dtype, device=bias.device
                )
                log_prop = prop.clamp_min(1e-8).log()
                bias.copy_(log_prop - log_prop.mean())

    def _normalized_output(self, generative_outputs: Mapping, modality: str) -> torch.Tensor:
        if modality == ATAC:
            return self.open_probability(generative_outputs[K.PX_KEY])
        return generative_outputs[K.PX_RNA_SCALE_KEY]

    def _decode(self, z, library, cats: list, cont) -> dict:
        """ATAC logits under ``"px"``; RNA proportions and NB under ``"px_rna*"``."""
        outputs: dict[str, torch.Tensor | NegativeBinomial] = {}
        if ATAC in self.modalities:
            outputs[K.PX_KEY] = self.decoders[ATAC](z, *cats, cont=cont)
        if RNA in self.modalities:
            scale = torch.softmax(self.decoders[RNA](z, *cats, cont=cont), dim=-1)
            outputs[K.PX_RNA_SCALE_KEY] = scale
            if library is not None:
                outputs[K.PX_RNA_KEY] = NegativeBinomial(mu=library * scale, theta=self.px_r.exp())
        return outputs

    # ------------------------------------------------------------------ objective
    def _log_likelihood_fn(
        self,
        tensors: dict[str, torch.Tensor],
        mask: torch.Tensor,
        device: torch.device,
        scaled: bool,
        by_modality: bool = False,
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``z (N, B, D) -> sum_m scale_m log p(x_m|z)`` over the modalities each cell has,
        ``(N, B)``; with ``by_modality`` each modality's term, ``(N, M, B)`` (zero where a
        cell lacks the modality)."""
        cats, cont = self._decoder_covariates(tensors, device)
        data = {}
        atac_offset: torch.Tensor | float = 0.0
        if ATAC in self.modalities:
            # binarized in its layout: a sparse minibatch stays CSR (the sparse Bernoulli term)
            data[ATAC] = binarize(self.select_peaks(tensors[ATAC_KEY].to(device)))
            atac_offset = self.depth_logit_offset(data[ATAC])
        if RNA in self.modalities:
            data[RNA] = _dense(tensors[RNA_KEY].to(device))
        present = dict(zip(self.modalities, mask.bool(), strict=True))
        scales = {m: (self.likelihood_scale[m] if scaled else 1.0) for m in self.modalities}
        # A modality whose expert is off (select_experts) is decoded from the latent the
        # other experts give without moving it: its gradient stops at z. Cells that have only
        # that modality are encoded by its expert, and their latent follows it as usual.
        # Tensor operations only: no host synchronization per minibatch.
        moves = self.expert_mask(mask.bool()) | self.expert_active.unsqueeze(-1)  # (M, B)
        moves_z = dict(zip(self.modalities, moves.unsqueeze(-1), strict=True))

        def latent_for(m: str, z: torch.Tensor) -> torch.Tensor:
            return torch.where(moves_z[m], z, z.detach())

        def log_likelihood(z: torch.Tensor) -> torch.Tensor:
            terms = []  # in the order of self.modalities
            if ATAC in self.modalities:
                z_atac = latent_for(ATAC, z)
                logits = self.decoders[ATAC](z_atac, *cats, cont=cont) + atac_offset
                ll = self.atac_log_likelihood(logits, data[ATAC])
                terms.append(scales[ATAC] * torch.where(present[ATAC], ll, 0.0))
            if RNA in self.modalities:
                x = data[RNA]
                scale = torch.softmax(self.decoders[RNA](latent_for(RNA, z), *cats, cont=cont), -1)
                mu = x.sum(-1, keepdim=True) * scale
                ll = NegativeBinomial(mu=mu, theta=self.px_r.exp()).log_prob(x).sum(-1)
                terms.append(scales[RNA] * torch.where(present[RNA], ll, 0.0))
            return torch.stack(terms, -2) if by_modality else sum(terms)

        return log_likelihood

    @torch.no_grad()
    def heldout_product_mean(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean of the product of every expert (on or off) for each cell, ``(B, D)``.

        ``NaN`` for a cell that lacks a modality. Their mean over the held-out cells is the
        latent shared by all of them that :meth:`heldout_fit` decodes as a baseline.
        """
        mask, _, poe_m = self._heldout_means(tensors)
        return torch.where(mask.all(0).unsqueeze(-1), poe_m, torch.nan)

    @torch.no_grad()
    def heldout_fit(
        self, tensors: dict[str, torch.Tensor], shared_z: torch.Tensor
    ) -> torch.Tensor:
        """How well each candidate latent explains each modality of a minibatch, ``(M + 2, M, B)``.

        Entry ``[c, k, n]`` is ``log p(x_k | z)`` of cell ``n`` (unweighted) with ``z`` the
        mean of expert ``c`` alone (``c < M``), the mean of the product of all experts
        (``c = M``; every expert counts, whether on or off), or ``shared_z`` (``c = M + 1``):
        one latent for every cell, the mean of the held-out cells'
        :meth:`heldout_product_mean`, which knows nothing of any one cell. ``NaN`` for a
        cell that lacks a modality. Read by :meth:`select_experts_on` on cells held out from
        training.
        """
        mask, qz_ms, poe_m = self._heldout_means(tensors)
        shared = shared_z.to(poe_m).expand_as(poe_m)
        z = torch.cat([qz_ms, poe_m.unsqueeze(0), shared.unsqueeze(0)])
        log_likelihood = self._log_likelihood_fn(
            tensors, mask, z.device, scaled=False, by_modality=True
        )
        return torch.where(mask.all(0), log_likelihood(z), torch.nan)

    def _heldout_means(
        self, tensors: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The modality mask ``(M, B)``, each expert's mean ``(M, B, D)`` and the mean of the
        product of every expert, on or off, ``(B, D)``."""
        out = self.inference(**self._get_inference_input(tensors))
        mask = out[K.MODALITY_MASK_KEY]
        qz_ms = out[K.QZM_EXPERTS_KEY]
        poe_m, _ = product_of_experts(qz_ms, out[K.QZV_EXPERTS_KEY], mask)
        return mask, qz_ms, poe_m

    def select_experts_on(
        self,
        fit: torch.Tensor,
        z_threshold: float = EXPERT_Z_THRESHOLD,
        min_gain: float = EXPERT_MIN_GAIN,
    ) -> dict[str, float]:
        """Switch off the expert of a modality that does not help explain held-out cells.

        ``fit`` is :meth:`heldout_fit` of cells held out from training that have every
        modality, ``(M + 2, M, N)``. The expert of modality ``m`` is switched off
        (:attr:`expert_active`) when both of these hold:

        - the posterior without it (with two modalities: the other expert alone) explains
          these cells better than the product of every expert, in the log-likelihood of all
          their modalities, by more than ``z_threshold`` standard errors of the mean
          per-cell difference: its encoder then adds nothing that holds beyond the training
          cells (the encoder of a modality that carries no signal learns the training cells
          by heart, and its confident but meaningless means move the product, and with it
          the latent, of every cell);
        - the product does not explain modality ``m`` itself better than one latent shared
          by all held-out cells, by at least ``min_gain`` nats per cell and ``z_threshold``
          standard errors: the latent holds nothing about these cells' modality ``m``.

        The second condition keeps an expert whose modality the latent explains on new
        cells even when the other modality, which weighs more nats (RNA counts against a
        sparse ATAC profile), loses more in sum. Its likelihood stays in the objective,
        decoded from the latent without moving it (see ``select_experts``). Where the
        evidence is weaker every expert stays; if every expert would go, the one that
        explains the cells best stays.

        Returns the mean log-likelihood per held-out cell, summed over the modalities, of
        each candidate (``"atac"``, ``"rna"``, ``"product"``, ``"shared"``); for each
        modality the z-score of the evidence against its expert (``"z_atac"``, ``"z_rna"``:
        positive where the product does worse with it), the gain per cell of the product
        over the shared latent on that modality (``"gain_atac"``, ``"gain_rna"``) and its
        z-score (``"z_gain_atac"``, ``"z_gain_rna"``); and the number of cells.
        """
        if len(self.modalities) != 2:
            raise ValueError("The held-out check of the experts needs two modalities.")
        n_modalities = len(self.modalities)
        if fit.dim() != 3 or fit.shape[:2] != (n_modalities + 2, n_modalities):
            raise ValueError(
                f"`fit` must be heldout_fit's (M + 2, M, N) = ({n_modalities + 2}, "
                f"{n_modalities}, N) array; got the shape {tuple(fit.shape)}."
            )
        fit = fit.double()
        n_cells = fit.shape[-1]
        total = fit.sum(1)  # (M + 2, N): every modality
        means = total.mean(-1)
        report: dict[str, float] = {m: float(means[i]) for i, m in enumerate(self.modalities)}
        report["product"] = float(means[-2])
        report["shared"] = float(means[-1])

        def z_score(diff: torch.Tensor) -> float:
            se = float(diff.std()) / math.sqrt(n_cells)  # NaN for one cell: no evidence
            return float(diff.mean()) / se if se > 0 else 0.0

        keep = []
        for i, m in enumerate(self.modalities):
            z = z_score(total[1 - i] - total[-2])  # the other expert alone, against the product
            gain = fit[-2, i] - fit[-1, i]  # the product against the shared latent, on m
            z_gain = z_score(gain)
            report[f"z_{m}"] = z
            report[f"gain_{m}"] = float(gain.mean())
            report[f"z_gain_{m}"] = z_gain
            informs = float(gain.mean()) >= min_gain and z_gain > z_threshold
            keep.append(z <= z_threshold or informs)
        if not any(keep):
            keep[int(torch.argmax(means[:2]))] = True
        self.expert_active.copy_(torch.tensor(keep, device=self.expert_active.device))
        report["n_cells"] = n_cells
        return report

    def joint_cluster_probabilities(self, inference_outputs: dict) -> torch.Tensor:
        """``q(c | x_1..M) = E_q(z|x_1..M)[p(c | z)]`` for the mixture of experts, ``(B, K)``.

        The expectation over the mixture is the mean over the mixture components a cell has
        (its experts, and their product with ``posterior="mopoe"``), each evaluated at its
        mean and weighted by its mixture weight: ``sum_c alpha_c p(c | E_q_c[z])``. The
        mixture's own mean can fall between components of the prior when the experts
        disagree; this cannot.
        """
        weights = inference_outputs[K.COMPONENT_LOG_WEIGHTS_KEY].exp()
        resp = self.prior.responsibilities(inference_outputs[K.QZM_COMPONENTS_KEY])  # (C, B, K)
        return (weights.unsqueeze(-1) * resp).sum(0)

    def _loss(self, tensors, inference_outputs, generative_outputs, kl_weight, objective):
        """The negative stratified bound: ``reconstruction_loss`` (the mean weighted negative
        log-likelihood of the particles) and ``kl_local`` sum to it per cell."""
        qz_ms = inference_outputs[K.QZM_COMPONENTS_KEY]
        mask = inference_outputs[K.COMPONENT_MASK_KEY]
        log_alpha = inference_outputs[K.COMPONENT_LOG_WEIGHTS_KEY]
        log_w, log_lik = moe_importance_log_weights(
            self._log_likelihood_fn(
                tensors, inference_outputs[K.MODALITY_MASK_KEY], qz_ms.device, scaled=True
            ),
            self.prior,
            qz_ms,
            inference_outputs[K.QZV_COMPONENTS_KEY],
            mask,
            n_particles=self.n_particles,
            kl_weight=kl_weight,
            dreg=objective == "dreg",
            chunk_size=self.particle_chunk_size,
            log_weights=log_alpha,
        )
        bound_fn = moe_elbo_bound if objective == "elbo" else moe_iwae_bound
        bound = bound_fn(log_w, mask, log_alpha)
        reconst = -moe_elbo_bound(log_lik, mask, log_alpha)
        kl = -bound - reconst
        if kl_weight != 1.0:
            kl = kl.detach()
        return LossOutput(loss=-bound.mean(), reconstruction_loss=reconst, kl_local=kl)

    def _log_marginal(
        self, tensors, inference_outputs, n_particles: int, chunk_size: int | None
    ) -> torch.Tensor:
        qz_ms = inference_outputs[K.QZM_COMPONENTS_KEY]
        mask = inference_outputs[K.COMPONENT_MASK_KEY]
        log_alpha = inference_outputs[K.COMPONENT_LOG_WEIGHTS_KEY]
        log_w, _ = moe_importance_log_weights(
            self._log_likelihood_fn(
                tensors, inference_outputs[K.MODALITY_MASK_KEY], qz_ms.device, scaled=False
            ),
            self.prior,
            qz_ms,
            inference_outputs[K.QZV_COMPONENTS_KEY],
            mask,
            n_particles=n_particles,
            chunk_size=chunk_size,
            log_weights=log_alpha,
        )
        return moe_iwae_bound(log_w, mask, log_alpha)


__all__ = ["MultiSCALEVAE"]
