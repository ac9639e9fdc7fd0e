"""The SCALE model: the user-facing class."""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS, settings
from scvi.data.fields import (
    CategoricalJointObsField,
    CategoricalObsField,
    NumericalJointObsField,
)
from scvi.model.base import ArchesMixin, BaseModelClass, UnsupervisedTrainingMixin, VAEMixin

if TYPE_CHECKING:
    from mudata import MuData

from scale_scvi.module import ATAC, ATAC_KEY, JOINT, SCALEVAE, Modality, module_class
from scale_scvi.module._components import DEFAULT_N_HIDDEN
from scale_scvi.module._feature_stats import open_fraction
from scale_scvi.pp._counts import get_matrix, matrix_name
from scale_scvi.train import (
    EpochMetricsTrainingPlan,
    ExpertCheckCallback,
    FiniteLossGuard,
    FusedAdamW,
    GMMInitCallback,
    InterruptRecorder,
    SparseDataSplitter,
    flush_denormal,
)
from scale_scvi.train._gmm_init import check_gmm_init_method
from scale_scvi.train._quiet import (
    StderrProgressBar,
    no_download_message,
    small_last_batch_warning_ignored,
    sparse_minibatch_warnings_handled,
)

from . import _peaks
from ._canonical import CanonicalAnnDataManager, warn_if_not_canonical
from ._differential import DifferentialMixin
from ._features import FeatureIdentityMixin
from ._imputation import ImputationMixin, feature_names
from ._io import ModelFolderMixin, weights_will_be_restored
from ._mudata import MuDataSetupMixin
from ._peak_selection import (
    MIN_FRACTION,
    MIN_OPEN_SHARE,
    N_MIN_PEAKS,
    N_TOP_PEAKS,
    OPEN_CELLS_KEY,
    SELECTED_PEAKS_KEY,
    PeakLayerField,
    check_setup_selection,
)
from ._validation import (
    validate_accessibility_matrix,
    validate_count,
    validate_data_split,
    validate_layer_widths,
    validate_n_centroids,
    validate_obs_keys,
    validate_rate,
    validate_saved_var_names,
    validate_unique_var_names,
)

logger = logging.getLogger(__name__)

#: Upper bound on the number of clusters when ``n_centroids`` is not given.
MAX_CENTROIDS = 30
#: Optimizer steps of the default training length (see :meth:`SCALE.train`).
N_STEPS = 4_000
#: Dropout of the ATAC encoder's hidden layers on at most :data:`DROPOUT_FULL_CELLS` cells.
DROPOUT_RATE = 0.1
#: Number of cells above which the default dropout falls as ``1 / n_cells**2``.
DROPOUT_FULL_CELLS = 1_500
#: Number of LSI coordinates the ATAC encoder reads on fewer than :data:`LSI_BELOW_CELLS`
#: cells by default (``n_lsi="auto"``).
N_LSI = 30
#: Number of cells from which the ATAC encoder reads the peaks by default.
LSI_BELOW_CELLS = 800
#: AdamW weight decay of the ATAC decoder when its peaks are open in at most
#: :data:`DECODER_DECAY_FULL_OPEN` cells each on average.
DECODER_WEIGHT_DECAY = 0.2
#: Mean number of cells a peak is open in, up to which the decoder gets the full decay.
DECODER_DECAY_FULL_OPEN = 6
#: Mean number of cells a peak is open in, from which the decoder gets no decay of its own.
DECODER_DECAY_NONE_OPEN = 15


def default_max_epochs(
    n_cells: int,
    train_size: float | None,
    batch_size: int,
    n_steps: int = N_STEPS,
) -> int:
    """Epochs that make about ``n_steps`` optimizer steps (at least 2 epochs)."""
    n_train = math.ceil((1.0 if train_size is None else train_size) * n_cells)
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    return max(2, math.ceil(n_steps / steps_per_epoch))


def default_dropout_rate(n_cells: int) -> float:
    """The ATAC model's default dropout after the encoder's hidden layers:
    :data:`DROPOUT_RATE` on up to :data:`DROPOUT_FULL_CELLS` cells, then
    ``DROPOUT_RATE * (DROPOUT_FULL_CELLS / n_cells) ** 2`` (0.025 at 3,000 cells, 0.002 at
    10,000).

    The default training makes the same number of optimizer steps whatever the number of
    cells, so each cell is seen about ``N_STEPS * batch_size / n_cells`` times; the fewer the
    cells, the more closely the encoder fits them and the more it needs holding back. On
    thousands of cells dropout splits the clusters instead (``benchmarks/NOTES.md``), hence
    the steep fall.
    """
    return DROPOUT_RATE * min(1.0, DROPOUT_FULL_CELLS / n_cells) ** 2


def default_n_lsi(n_cells: int) -> int | None:
    """The ATAC model's default encoder input: :data:`N_LSI` LSI coordinates on fewer than
    :data:`LSI_BELOW_CELLS` cells, the peaks (``None``) from there on.

    On a few hundred cells an encoder of tens of thousands of peaks fits each training cell
    and the clusters fall far below LSI's; reading LSI coordinates it cannot. On thousands of
    cells the encoder of the peaks gives the better clusters (``benchmarks/NOTES.md``, "The
    encoder reads LSI coordinates on few cells").
    """
    return N_LSI if n_cells < LSI_BELOW_CELLS else None


def default_decoder_weight_decay(open_cells_per_peak: float, weight_decay: float) -> float:
    """The ATAC model's default weight decay of its decoder: :data:`DECODER_WEIGHT_DECAY` when
    the peaks it reads are open in at most :data:`DECODER_DECAY_FULL_OPEN` cells each on
    average, falling linearly to ``weight_decay`` (the other parameters') at
    :data:`DECODER_DECAY_NONE_OPEN` cells.

    The decoder has ``n_latent + 1`` parameters per peak, fitted to the few cells in which the
    peak is open. When these are a handful (a few hundred sparse cells) the decoder fits the
    training cells: the held-out ELBO rises from the first epochs while the training ELBO
    falls, and the clusters fall below LSI's. The decay holds the decoder back there; on
    denser data it splits the cell types instead (``benchmarks/NOTES.md``, "Weight decay of
    the decoder on sparse few cells").
    """
    fade = (DECODER_DECAY_NONE_OPEN - open_cells_per_peak) / (
        DECODER_DECAY_NONE_OPEN - DECODER_DECAY_FULL_OPEN
    )
    return max(weight_decay, DECODER_WEIGHT_DECAY * min(1.0, max(0.0, fade)))


def _torch_rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """torch's global random state: the CPU generator's, and every CUDA device's if in use."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.random.get_rng_state(), cuda


def _set_torch_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    cpu, cuda = state
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _make_optimizer(
    module: torch.nn.Module,
    params,
    decoder_weight_decay: float | None = None,
    **kwargs,
) -> FusedAdamW:
    """The optimizer of one run of ``train``, made when the run starts: the networks of a
    modality whose expert is off at that time (the new start after the held-out check of the
    experts) are clipped apart from the rest.

    ``decoder_weight_decay`` (if given) is the weight decay of the ATAC model's decoder
    (``weight_decay_apart``); the other parameters take ``kwargs["weight_decay"]``.

    A parameter whose gradient passes through a hook is not decayed: scArches' query mapping
    (``load_query_data``) trains only the covariate columns of the reference's weights and
    keeps the rest fixed by zeroing their gradients in such a hook, and AdamW's decoupled
    weight decay, which does not read the gradient, would still shrink them.
    """
    params = list(params)
    masked = [p for p in params if p._backward_hooks]
    if masked:
        free = [p for p in params if not p._backward_hooks]
        params = [{"params": masked, "weight_decay": 0.0}] + ([{"params": free}] if free else [])
    decoder = []
    if decoder_weight_decay not in (None, kwargs.get("weight_decay")):
        decoder = [p for p in module.decoder.parameters() if not p._backward_hooks]
    return FusedAdamW(
        params,
        weight_decay_apart=[(p, decoder_weight_decay) for p in decoder],
        in_place_layers=module.in_place_layers(),
        clip_apart=module.separately_clipped_parameters(),
        **kwargs,
    )


#: Arguments of scvi-tools' training plan that :meth:`SCALE.train` sets itself.
_PLAN_KEYS_SET_BY_TRAIN = ("optimizer", "optimizer_creator", "n_steps_kl_warmup")


def _check_plan_kwargs(plan_kwargs: dict, **train_args) -> None:
    """Refuse ``plan_kwargs`` that ``train`` would override with another value: the
    optimizer, its settings and the KL warm-up are ``train``'s own arguments
    (``train_args``, as resolved)."""
    for key, value in train_args.items():
        if key in plan_kwargs and plan_kwargs[key] != value:
            raise ValueError(
                f"plan_kwargs[{key!r}]={plan_kwargs[key]!r} would be ignored: train() sets "
                f"it from its own argument. Pass {key}={plan_kwargs[key]!r} to train() "
                "instead, and drop it from plan_kwargs."
            )
    for key in _PLAN_KEYS_SET_BY_TRAIN:
        if key in plan_kwargs:
            raise ValueError(
                f"plan_kwargs[{key!r}] would be ignored: train() always trains with "
                "FusedAdamW (AdamW; lr, weight_decay, eps and gradient_clip_val are its "
                "arguments) and a KL warm-up counted in epochs (n_epochs_kl_warmup). Drop "
                f"{key!r} from plan_kwargs."
            )


def _trains_on_cpu(accelerator: str) -> bool:
    """Whether Lightning's ``accelerator`` setting resolves to the CPU."""
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


def _quiet_trainer_kwargs(trainer_kwargs: dict, n_train_batches: int, callbacks: list) -> dict:
    """scvi-tools' trainer arguments with its progress bar on stderr (appended to
    ``callbacks``) and Lightning's logging interval within an epoch (else Lightning warns
    on small data)."""
    kwargs = dict(trainer_kwargs)
    kwargs.setdefault("log_every_n_steps", max(1, min(10, n_train_batches)))
    if kwargs.get("enable_progress_bar", True) and kwargs.get("simple_progress_bar", True):
        kwargs["simple_progress_bar"] = False
        callbacks.append(StderrProgressBar())
    return kwargs


class SCALE(
    ModelFolderMixin,
    FeatureIdentityMixin,
    MuDataSetupMixin,
    ImputationMixin,
    DifferentialMixin,
    ArchesMixin,
    VAEMixin,
    UnsupervisedTrainingMixin,
    BaseModelClass,
):
    """SCALE: single-cell ATAC-seq analysis via latent feature extraction.

    A variational autoencoder whose prior is a Gaussian mixture, so that its components
    are cell clusters (Xiong et al., Nat. Commun. 2019), on scvi-tools.

    One class for scATAC-seq (:meth:`setup_anndata`) and for RNA + ATAC
    (:meth:`setup_mudata`): the registered modalities choose the module
    (:class:`~scale_scvi.module.SCALEVAE` for ATAC alone,
    :class:`~scale_scvi.module.MultiSCALEVAE` otherwise; the instance's ``_module_cls``),
    and every method reads it through the interface of
    :class:`~scale_scvi.module.SCALEModuleBase`, so the outputs have the same names and
    meaning for both. (scvi-tools keeps PEAKVI and MULTIVI apart because their outputs
    differ; here they do not, and one class keeps one ``train()`` and one set of defaults.)

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_centroids
        Number of mixture components (clusters) ``K``. ``None`` (default): the data choose
        it, up to 30 (or the number of cells): the mixture is initialized from a Leiden
        partition of the posterior means whose pieces that one Gaussian describes as well
        are merged, and components that no cell takes are switched off during and at the
        end of training. An integer gives exactly that many components (fitted by
        k-means), of which those no cell takes are switched off at the end. Either way the
        mixture is fitted once more, the same way, on the posterior means of the trained
        encoder when training ends, each component from the central 80 % of its cluster
        (:func:`~scale_scvi.train.fit_gmm`'s ``trim``); without ``n_centroids`` that fit
        reads Leiden at resolution 0.75 (:data:`~scale_scvi.train.REFIT_RESOLUTION`), so
        that the merge starts from larger pieces and a large population is less often cut
        in two. :attr:`n_clusters_` is the number left.
    n_latent
        Latent dimensionality.
    n_hidden
        Encoder hidden-layer widths. The default ``(256, 128)`` trains in less than half the
        time of the original SCALE's ``(1024, 128)``, with a first layer a quarter the size
        (``n_peaks x 256`` weights); averaged over the seeds of the benchmark sets, its clusters
        were as good (``benchmarks/NOTES.md``).
    n_hidden_decoder
        Decoder hidden-layer widths; ``()`` (default) is SCALE's linear decoder. Measured
        on the cell lines (seed 0, ``(128,)``), a hidden layer costs the clusters most of
        their quality: with the logit link own clusters ARI 0.30 and k-means 0.34, with the
        decoder's batch norm 0.02 and 0.46 (linear decoder: 0.68 and 0.70), and with the
        default complementary log-log link training stopped on a non-finite loss at 70 % of
        its epochs (``benchmarks/NOTES.md``, "A hidden layer in the decoder").
    dropout_rate
        Dropout after each of the encoder's hidden layers in training. ``None`` (default):
        for ATAC alone, 0.1 on up to 1,500 cells and ``0.1 x (1,500 / n_cells)^2`` above
        (0.025 at 3,000 cells, 0.002 at 10,000; ``default_dropout_rate``), fixed when the
        model is made; 0 for a MuData with RNA. Measured on the default path
        (``benchmarks/NOTES.md``, "Dropout that fades with the number of cells"): on the
        shared sets (seeds 0 / 1 / 2) 0.1 raised forebrain's own clusters from 0.626 / 0.630
        / 0.651 to 0.661 / 0.656 / 0.701 and k-means from 0.684 / 0.648 / 0.612 to 0.687 /
        0.664 / 0.674 (the cell lines: own clusters 0.632 / 0.672 / 0.692 against 0.679 /
        0.649 / 0.648); on 250 cell-line cells k-means went from 0.28 / 0.03 to 0.52 / 0.53
        (seeds 0 / 1). On thousands of cells it splits the clusters: on 3,000 forebrain
        pooled cells (8 parents) 0.067 gave own clusters 0.84 / 0.85 against 0.89 / 1.00
        without dropout (0.025: 0.96 / 0.85), on 10,000 a fixed 0.1 gave 0.69 (15
        clusters) against 0.95 (10).
        ``0.0`` turns it off.
    objective
        ``"elbo"``, ``"iwae"`` or ``"dreg"``; see :class:`~scale_scvi.module.SCALEVAE`.
    n_particles
        Importance samples per cell for ``"iwae"`` and ``"dreg"``.
    n_lsi
        What the ATAC encoder reads. ``"auto"`` (default): 30 LSI coordinates on fewer than
        800 cells, the peaks from 800 cells on (``default_n_lsi``), fixed when the model is
        made. An integer: that many LSI coordinates
        (:class:`~scale_scvi.module.LSIProjection`: TF-IDF of the binarized peaks read,
        ``log1p``, projected on the leading singular vectors but the first of the data's
        TF-IDF matrix, rows normalized; fitted once when the model is made, saved with it
        and used unchanged on new cells). ``None``: the peaks, as the original SCALE. An
        encoder of tens of thousands of peaks fits each of a few hundred training cells,
        and their clusters fall far below LSI's; reading 30 coordinates it cannot. Measured
        on random subsets of the labeled sets (``benchmarks/NOTES.md``, "The encoder reads
        LSI coordinates on few cells"; seeds 0 / 1; before the decoder's own weight decay
        of :meth:`train`), the own clusters with the peaks and with 30 coordinates: 250
        forebrain cells 0.08 / 0.08 and 0.32 / 0.34, 500 cells 0.41 / 0.38 and 0.49 /
        0.59, 750 cells 0.44 / 0.44 and 0.60 / 0.57 (seeds 2 / 3:
        0.61 / 0.61 and 0.53 / 0.60), 250 cell-line cells 0.46 / 0.52 and 0.55 / 0.52; on
        900 forebrain cells the peaks were ahead on four seeds of four (0.59 / 0.66 / 0.70 /
        0.64 against 0.56 / 0.60 / 0.56 / 0.55), and on 3,000 pooled forebrain cells far ahead of
        100 coordinates (0.95 against 0.75, seed 0). The gain comes from sets with many
        peaks per cell; on the cell lines' 5,036 peaks it is small or absent (300 of their
        cells: own clusters 0.51-0.61 against 0.62-0.65 with ``None``; a query mapped onto
        either got 65-70 % of its labels right). Only for ATAC alone; a MuData with RNA
        encodes the peaks.
    **module_kwargs
        Further arguments of the module: :class:`~scale_scvi.module.SCALEVAE` (such as
        ``atac_link="logit"``, the original SCALE's link of the ATAC likelihood), or for
        a MuData with RNA :class:`~scale_scvi.module.MultiSCALEVAE` (such as
        ``likelihood_scale``, ``input_dropout``, ``posterior``, ``mixture_weights`` and
        ``select_experts``).

    Examples
    --------
    >>> SCALE.setup_anndata(adata)
    >>> model = SCALE(adata)
    >>> model.train()
    >>> adata.obsm["X_scale"] = model.get_latent_representation()
    >>> adata.obs["scale_cluster"] = model.get_cluster_assignments()
    >>> model.n_clusters_
    """

    #: The module of an AnnData model; a model set up with ``setup_mudata`` on RNA sets its
    #: own (:func:`~scale_scvi.module.module_class` of the registered modalities).
    _module_cls = SCALEVAE
    _data_splitter_cls = SparseDataSplitter
    _training_plan_cls = EpochMetricsTrainingPlan

    def __init__(
        self,
        adata: AnnData,
        n_centroids: int | None = None,
        n_latent: int = 10,
        n_hidden: Sequence[int] = DEFAULT_N_HIDDEN,
        n_hidden_decoder: Sequence[int] = (),
        dropout_rate: float | None = None,
        objective: Literal["elbo", "iwae", "dreg"] = "elbo",
        n_particles: int | None = None,
        n_lsi: int | Literal["auto"] | None = "auto",
        **module_kwargs,
    ):
        super().__init__(adata)
        if n_centroids is not None:
            validate_n_centroids(n_centroids, self.summary_stats.n_cells)
        validate_count(n_latent, "n_latent")
        validate_layer_widths(n_hidden, "n_hidden")
        validate_layer_widths(n_hidden_decoder, "n_hidden_decoder")
        self._choose_n_clusters = n_centroids is None
        n_components = (
            min(MAX_CENTROIDS, self.summary_stats.n_cells) if n_centroids is None else n_centroids
        )
        if n_particles is None:
            n_particles = 1 if objective == "elbo" else 8
        n_cats_per_cov = (
            self.adata_manager.get_state_registry(REGISTRY_KEYS.CAT_COVS_KEY).n_cats_per_key
            if REGISTRY_KEYS.CAT_COVS_KEY in self.adata_manager.data_registry
            else []
        )
        self._module_cls = module_class(self._registered_modalities())
        if dropout_rate is None:  # resolved here, so that a saved model keeps its rate
            dropout_rate = (
                default_dropout_rate(self.summary_stats.n_cells)
                if self._module_cls is SCALEVAE
                else 0.0
            )
        else:
            validate_rate(dropout_rate, "dropout_rate")
        inputs = self._module_cls.input_arguments(self._n_features(), self._modality_flags())
        inputs.update(self._peak_selection())
        if self._module_cls is SCALEVAE:  # resolved here too, and kept by a saved model
            if n_lsi == "auto":
                n_lsi = default_n_lsi(self.summary_stats.n_cells)
            inputs["n_lsi"] = n_lsi
        elif n_lsi not in ("auto", None):
            raise ValueError(
                "n_lsi is an argument of the model of ATAC alone; a MuData with RNA encodes "
                "the peaks. Leave n_lsi out."
            )
        self.module = self._module_cls(
            **inputs,
            n_batch=self.summary_stats.n_batch,
            n_centroids=n_components,
            n_latent=n_latent,
            n_hidden=tuple(n_hidden),
            n_hidden_decoder=tuple(n_hidden_decoder),
            n_continuous_cov=self.summary_stats.get("n_extra_continuous_covs", 0),
            n_cats_per_cov=n_cats_per_cov,
            dropout_rate=dropout_rate,
            objective=objective,
            n_particles=n_particles,
            **module_kwargs,
        )
        if not weights_will_be_restored():  # load and query mapping bring the fitted state
            self.module.init_from_data(
                {
                    m: self.adata_manager.get_from_registry(self.module.registry_key(m))
                    for m in self.module.modalities
                }
            )
        k = f"at most {n_components} (chosen by the data)" if n_centroids is None else n_centroids
        peaks = self.module.n_peaks if ATAC in self.module.modalities else None
        # what the encoder reads is added from the module when the summary is read
        self._summary_parts = (
            f"SCALE model with n_centroids: {k}, n_latent: {n_latent}, "
            + (f"peaks read: {peaks}, " if peaks is not None else "")
            + f"encoder: {tuple(n_hidden)} (dropout {dropout_rate:.3g}",
            f"), decoder: {tuple(n_hidden_decoder) or 'linear'}, "
            f"objective: {objective} (n_particles: {n_particles}), "
            f"modalities: {self.module.modalities}",
        )
        self.init_params_ = self._get_init_params(locals())
        #: Names of the peaks the model reads (chosen by :meth:`setup_anndata`), in order:
        #: the columns of :meth:`get_normalized_accessibility` and the peaks of
        #: :meth:`get_cluster_specific_peaks` and :meth:`differential_accessibility`.
        self.selected_peaks_ = self._selected_peak_names()
        #: Number of clusters: the mixture components on (after training, those left);
        #: :meth:`get_cluster_assignments` labels cells ``"0"`` .. ``n_clusters_ - 1``.
        self.n_clusters_ = self.module.prior.n_active
        #: What the held-out check of the experts measured in the last :meth:`train` of a
        #: multimodal model made with ``select_experts`` (see
        #: :meth:`~scale_scvi.module.MultiSCALEVAE.select_experts_on`); ``None`` when no
        #: check was made.
        self.expert_check_: dict | None = None

    @property
    def _model_summary_string(self) -> str:
        """The summary that ``print(model)`` shows. What the encoder reads comes from the
        module, so that a model saved before the LSI input, whose encoder reads the peaks,
        says so when loaded."""
        parts = self.__dict__.get("_summary_parts")
        if parts is None:
            return self.__dict__.get("_summary_plain", "")
        n_lsi = getattr(self.module, "n_lsi", None)
        return parts[0] + (f", reads {n_lsi} LSI coordinates" if n_lsi else "") + parts[1]

    @_model_summary_string.setter
    def _model_summary_string(self, value: str) -> None:
        self._summary_plain = value
        self._summary_parts = None

    def _peak_selection(self) -> dict:
        """``{"peak_index": ...}`` for the module when the registry selected peaks (by
        ``setup_anndata`` or ``setup_mudata``), else ``{}``."""
        registered = self._registered_modalities()
        if ATAC not in registered:
            return {}
        # the peak matrix is X, or stands beside the RNA's X in a MuData with both
        key = ATAC_KEY if len(registered) == 2 else REGISTRY_KEYS.X_KEY
        index = self.adata_manager.get_state_registry(key).get(SELECTED_PEAKS_KEY)
        if index is None or len(index) == self._n_features()[ATAC]:
            return {}
        return {"peak_index": np.asarray(index)}

    def _selected_peak_names(self) -> pd.Index | None:
        """Names of the peaks read, from the registry (``None`` for a model without ATAC)."""
        if self.adata_manager.registry.get("setup_method_name") == "setup_anndata":
            names = pd.Index(
                self.adata_manager.get_state_registry(REGISTRY_KEYS.X_KEY).column_names
            )
            index = getattr(self.module, "peak_index", None)
            return names if index is None else names[index.cpu().numpy()]
        return _peaks.peak_names(self) if ATAC in self.module.modalities else None

    def _cluster_components(self) -> np.ndarray:
        """Index of the mixture component of each cluster label (the components left on)."""
        return np.flatnonzero(self.module.prior.active.cpu().numpy())

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        min_cells: int | None = None,
        min_fraction: float | None = MIN_FRACTION,
        n_top_peaks: int | None = N_TOP_PEAKS,
        n_min_peaks: int | None = N_MIN_PEAKS,
        min_open_share: float | None = MIN_OPEN_SHARE,
        **kwargs,
    ) -> None:
        """Register an AnnData of cells x peaks with SCALE.

        Counts or binary values are accepted; any value > 0 is read as accessible, and the
        binarization happens inside the model (the matrix is not modified).

        The model reads only the peaks open in enough cells, and at most ``n_top_peaks`` of
        them: by default those open in at least 1 % of the cells, at most the 50,000 most
        often open (peaks open in a handful of cells carry little but noise, and cost
        training time and memory in proportion to their number; see ``benchmarks/NOTES.md``,
        "Default path"). On shallow data a fixed fraction of the cells drops most of the
        signal, so the threshold is lowered: to the count of the 10,000th most often open
        peak when fewer than ``n_min_peaks`` (10,000) reach 1 %, and to the count of the
        last of the most often open peaks that together hold ``min_open_share`` (60 %) of
        the matrix's open entries (cell-peak pairs with a value > 0) when those that reach
        1 % hold less; whichever reads more peaks, the cap still applying. On forebrain at
        half its reads the 1 % rule alone reads about 17,500 peaks holding 43 % of the open
        entries, the share rule about 37,500; forebrain at full depth (72 %), the cell lines
        and the sci-CAR kidney's ATAC (all of it) are read as before (``benchmarks/NOTES.md``,
        "Shallow data: the peaks that hold 60 % of the open entries"). The counts are made
        block by block of rows (the matrix is never densified); the selection is recorded in
        the registry and saved with the model, so that ``load``, ``load_query_data`` and
        every ``get_*`` on new data read the same peaks.
        :attr:`SCALE.selected_peaks_` names them. To read every peak, pass
        ``min_fraction=None, n_top_peaks=None``.

        Parameters
        ----------
        adata
            Cells x peaks AnnData (dense, CSR or CSC; in memory or backed).
        layer
            Layer holding the peak matrix; ``None`` for ``adata.X``.
        batch_key
            Column of ``adata.obs`` with the batch of each cell.
        categorical_covariate_keys
            Columns of ``adata.obs`` with further categorical covariates.
        continuous_covariate_keys
            Columns of ``adata.obs`` with continuous covariates.
        min_cells, min_fraction
            Read the peaks open in at least ``max(min_cells, ceil(min_fraction * n_cells))``
            cells; ``None`` for no such bound.
        n_top_peaks
            Of those, read at most this many, the ones open in the most cells; ``None``: all.
        n_min_peaks
            When fewer than this many peaks reach ``min_fraction``, read this many, the ones
            open in the most cells (never a peak open in no cell; ``min_cells`` still
            applies); ``None``: the fraction as given.
        min_open_share
            When the peaks that reach ``min_fraction`` hold less than this share of the open
            entries, read the most often open peaks that together hold it (``min_cells`` and
            ``n_top_peaks`` still apply); ``None``: the fraction as given.
        """
        # Before any other local, so that only the arguments are recorded (and saved).
        setup_method_args = cls._get_setup_method_args(**locals())
        check_setup_selection(min_cells, min_fraction, n_top_peaks, n_min_peaks, min_open_share)
        if not isinstance(adata, AnnData):
            raise TypeError(
                f"setup_anndata takes an AnnData, got {type(adata).__name__}; for a MuData use "
                "SCALE.setup_mudata."
            )
        matrix = get_matrix(adata, layer)
        validate_accessibility_matrix(
            matrix, matrix_name(layer), warn_empty="source_registry" not in kwargs
        )
        if "source_registry" not in kwargs:
            warn_if_not_canonical(matrix, matrix_name(layer))
        validate_unique_var_names(adata)
        validate_obs_keys(adata, [batch_key], "batch_key")
        validate_obs_keys(adata, categorical_covariate_keys or [], "categorical_covariate_keys")
        validate_obs_keys(adata, continuous_covariate_keys or [], "continuous_covariate_keys")
        anndata_fields = [
            PeakLayerField(
                REGISTRY_KEYS.X_KEY,
                layer,
                min_cells,
                min_fraction,
                n_top_peaks,
                n_min_peaks=n_min_peaks,
                min_open_share=min_open_share,
            ),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            CategoricalJointObsField(REGISTRY_KEYS.CAT_COVS_KEY, categorical_covariate_keys),
            NumericalJointObsField(REGISTRY_KEYS.CONT_COVS_KEY, continuous_covariate_keys),
        ]
        adata_manager = CanonicalAnnDataManager(
            fields=anndata_fields, setup_method_args=setup_method_args
        )
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    @classmethod
    def load(
        cls,
        dir_path: str,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        backup_url: str | None = None,
        **kwargs,
    ):
        """Load a saved model, optionally onto new data of the same peaks.

        As :meth:`scvi.model.base.BaseModelClass.load`, except that data whose peaks differ
        from the model's (other names, another order or another number) raise a
        ``ValueError`` instead of a warning: such a model would silently read the wrong
        peaks. New data on other peaks are mapped with :meth:`prepare_query_anndata` and
        :meth:`load_query_data`.

        Parameters
        ----------
        dir_path
            Folder of the saved model.
        adata
            Data to attach (default: the AnnData saved with the model, if any).
        accelerator, device, prefix, backup_url, **kwargs
            As in :meth:`scvi.model.base.BaseModelClass.load`.
        """
        if adata is not None:
            validate_saved_var_names(dir_path, adata, prefix)
        with no_download_message():
            return super().load(
                dir_path,
                adata=adata,
                accelerator=accelerator,
                device=device,
                prefix=prefix,
                backup_url=backup_url,
                **kwargs,
            )

    @classmethod
    def load_query_data(
        cls,
        adata: AnnData | MuData | None = None,
        reference_model: str | os.PathLike | BaseModelClass | None = None,
        *args,
        adapt_encoder: bool = False,
        **kwargs,
    ):
        """Map query cells onto a reference model (scArches' query mapping).

        As :meth:`scvi.model.base.ArchesMixin.load_query_data` (a saved reference is read
        safely), with one default of its own: the query is encoded by the reference's
        encoder. The query's batches take the encoder weights of the reference's average
        batch (zero when the reference had one batch), and the encoder is frozen, so
        ``train()`` on the query model fits only the decoder's columns of the query's
        batches (for its likelihoods, imputation and differential accessibility) and the
        query's latent and clusters are those of the reference's encoder. Training the
        encoder's batch columns too (``adapt_encoder=True``, scArches' own scheme) moved
        the query's cells away from their types in the measurements of
        ``benchmarks/NOTES.md`` ("Reference mapping: the query is encoded by the
        reference's encoder"): on the cell lines 46-57 % of the query's labels transferred
        against 65-69 % (47-59 % against 63-72 % when the query's peaks also differ in
        capture), on forebrain 31-35 % against 77-79 %.

        Parameters
        ----------
        adata
            Query data, set up as the reference (``prepare_query_anndata`` first when its
            peaks differ).
        reference_model
            The reference model, or the folder it was saved in.
        adapt_encoder
            Also train the encoder's columns of the query's batches (scArches' scheme).
        *args, **kwargs
            As in :meth:`scvi.model.base.ArchesMixin.load_query_data`. ``unfrozen=True``
            (every weight trains) and ``freeze_expression=False`` (the encoder's weights of
            the peaks train) leave the encoder trainable, as ``adapt_encoder=True`` does.
        """
        model = super().load_query_data(adata, reference_model, *args, **kwargs)
        # scvi-tools' own ways of training the encoder are honoured too
        adapt = (
            adapt_encoder
            or bool(kwargs.get("unfrozen", False))
            or not kwargs.get("freeze_expression", True)
        )
        model.module.prepare_query_encoders(cls._reference_n_batches(reference_model), adapt)
        return model

    @classmethod
    def _reference_n_batches(cls, reference_model: str | os.PathLike | BaseModelClass) -> int:
        """The number of batches a reference model was trained on (a model or its folder,
        whose registry is read safely)."""
        if isinstance(reference_model, BaseModelClass):
            return int(reference_model.summary_stats.n_batch)
        batch = cls.load_registry(os.fspath(reference_model))["field_registries"][
            REGISTRY_KEYS.BATCH_KEY
        ]
        return int(batch["summary_stats"]["n_batch"])

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        lr: float = 3e-3,
        weight_decay: float = 5e-4,
        decoder_weight_decay: float | None = None,
        batch_size: int = 32,
        eps: float = 1e-8,
        gradient_clip_val: float | None = 10.0,
        n_epochs_kl_warmup: int | None = None,
        gmm_init_epoch: int | None = None,
        gmm_init_method: Literal["kmeans", "em", "leiden"] | None = None,
        gmm_refit: bool = True,
        train_size: float | None = 0.9,
        validation_size: float | None = None,
        early_stopping: bool = False,
        load_sparse_tensor: bool | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        datasplitter_kwargs: dict | None = None,
        plan_kwargs: dict | None = None,
        **trainer_kwargs,
    ):
        """Train the model with scvi-tools' training plan and Lightning trainer.

        The defaults were chosen by the measurements in ``benchmarks/NOTES.md`` (section
        "Training defaults"). Training runs with ``torch.set_flush_denormal(True)``
        (:func:`~scale_scvi.train.flush_denormal`), restored when it ends or fails.

        The Gaussian mixture of the prior is fitted on the posterior means at the start of
        epoch ``gmm_init_epoch``, and again when training ends (the clusters are then read
        off the trained encoder's latent space), by a callback; nothing needs to be done by
        hand.

        Parameters
        ----------
        max_epochs
            Passes through the data. Default: as many as make 4,000 optimizer steps
            (``ceil(4000 / ceil(n_train / batch_size))``, at least 2): the length follows the
            optimizer, not the number of cells (measured in ``benchmarks/NOTES.md``,
            "Default path").
        lr
            Learning rate of AdamW (:class:`~scale_scvi.train.FusedAdamW`, torch's AdamW on
            its fused kernel).
        weight_decay
            Weight decay of AdamW. Parameters that scArches' query mapping keeps partly fixed
            (``load_query_data``: a gradient hook zeroes their reference entries) are not
            decayed, so that the reference's weights stay as they were.
        decoder_weight_decay
            Weight decay of the ATAC model's decoder (the peaks' weights and biases).
            Default: 0.2 when the peaks the model reads are open in at most 6 cells each on
            average (a few hundred sparse cells), falling linearly to ``weight_decay`` at 15
            cells and beyond (``default_decoder_weight_decay``; the count is made by
            ``setup_anndata`` and kept with the model). There the decoder otherwise fits the
            training cells. On 250 forebrain cells (5.6 cells per peak) the own clusters rose
            from ARI 0.30 to 0.43 on the mean of four seeds (LSI's Leiden 0.47), on 500
            (10.5 cells per peak, a decay of 0.1) from 0.51 to 0.53; denser sets train as
            before (``benchmarks/NOTES.md``, "Weight decay of the decoder on sparse few
            cells"). With RNA every network takes ``weight_decay``.
        batch_size
            Minibatch size. 32 (as in the original SCALE) gives four times the optimizer steps
            of scvi-tools' 128 for the same epochs, which small datasets need. Raise it for
            large datasets, especially on a GPU.
        eps
            Adam's epsilon (scvi-tools' default of 0.01 is tuned for scVI, not for SCALE).
        gradient_clip_val
            Clip the total gradient norm at this value (``None`` to disable), inside the
            optimizer's fused update (:class:`~scale_scvi.train.FusedAdamW`). Lightning's own
            clipping (``gradient_clip_algorithm``) is not used.
        n_epochs_kl_warmup
            Epochs over which the KL weight rises from 0 to 1. Default: a quarter of
            ``max_epochs``.
        gmm_init_epoch
            Epoch at whose start the prior's mixture is fitted to the posterior means.
            Default: the end of the KL warm-up, so that the mixture is fitted on a trained
            encoder.
        gmm_init_method
            How that mixture is fitted (:func:`~scale_scvi.train.fit_gmm`): ``"leiden"``
            reads it off a Leiden partition of the posterior means, merged where one Gaussian
            describes two overlapping pieces as well (by the integrated completed likelihood,
            :func:`~scale_scvi.train.fit_gmm`), so that the data choose the number of
            components;
            ``"kmeans"`` off a k-means partition into ``n_centroids`` clusters; ``"em"`` runs
            EM on a diagonal Gaussian mixture from there, which moved the partition away from
            the cell types in the measurements of ``benchmarks/NOTES.md``. Default:
            ``"leiden"`` for a model made without ``n_centroids``, else ``"kmeans"``.
        gmm_refit
            Fit the mixture once more, the same way, on the posterior means of the trained
            encoder when training ends, so that the clusters are read off the final latent
            space (measured in ``benchmarks/NOTES.md``, "Clusters read off the trained
            latent"); each component takes the moments of the central 80 % of its cluster
            (:data:`scale_scvi.train.REFIT_TRIM`; "Trimmed moments in the final fit"), and
            ``"leiden"`` reads its partition at resolution 0.75
            (:data:`scale_scvi.train.REFIT_RESOLUTION`; "The final fit at Leiden resolution
            0.75"). ``False`` keeps the mixture as trained.
        train_size, validation_size
            Fractions of cells for training and validation. Default: a random tenth of the
            cells is held out for validation (as in scvi-tools), which cost no cluster quality
            in the measurements of ``benchmarks/validation_split.md``; ``train_size=1.0``
            trains on every cell. The validation metrics are computed after every epoch
            (``check_val_every_n_epoch=1`` unless given) and are in :attr:`history` as
            ``*_validation`` (drawn by :func:`scale_scvi.pl.training_curves`). The outputs
            (latent, clusters) cover every cell either way.
        early_stopping
            Stop when the validation ELBO stops improving (needs cells held out:
            ``train_size < 1``, as by default).
        load_sparse_tensor
            The layout of the training minibatches, decided here only: ``True`` hands every
            data matrix to the module as sparse (CSR) tensors (no dense ``(batch, peaks)``
            minibatch is ever built; dense storage is converted per minibatch), ``False`` as
            dense tensors. ``None`` (default): ``True`` when training on the CPU (faster),
            ``False`` on a GPU, where sparse-dense products are not deterministic. The fits
            made during training (the mixture's, the held-out check of the experts) read the
            same layout.
        accelerator, devices
            Lightning accelerator and devices; ``strategy="ddp_find_unused_parameters_true"``
            with ``devices > 1`` trains on several processes.
        datasplitter_kwargs
            Further arguments of :class:`~scvi.dataloaders.DataSplitter`.
        plan_kwargs
            Further arguments of :class:`~scvi.train.TrainingPlan`. The optimizer and its
            settings (``lr``, ``weight_decay``, ``eps``) and the KL warm-up are this method's
            own arguments; giving them here with other values is refused.
        **trainer_kwargs
            Further arguments of :class:`~scvi.train.Trainer`.
        """
        if max_epochs is None:
            max_epochs = default_max_epochs(self.adata.n_obs, train_size, batch_size)
        if gmm_init_method is None:
            gmm_init_method = "leiden" if self._choose_n_clusters else "kmeans"
        if n_epochs_kl_warmup is None:
            n_epochs_kl_warmup = max(1, max_epochs // 4)
        if gmm_init_epoch is None:
            gmm_init_epoch = min(n_epochs_kl_warmup, max_epochs - 1)
        check_gmm_init_method(gmm_init_method, "gmm_init_method")
        has_batch_norm = self._has_batch_norm()
        validate_count(
            batch_size,
            "batch_size",
            minimum=2 if has_batch_norm else 1,
            why=" (batch normalization needs two cells per minibatch)" if has_batch_norm else "",
        )
        indexing = (datasplitter_kwargs or {}).get("external_indexing")
        external_indexing = indexing is not None
        n_validation = validate_data_split(
            train_size, validation_size, early_stopping, external_indexing=external_indexing
        )
        if external_indexing:
            n_validation = len(indexing[1]) if len(indexing) > 1 else 0
        if n_validation > 0:
            # scvi-tools' trainer validates only with early stopping unless told; held-out
            # cells should give the validation curves of `history` (and of training_curves).
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        prior_trains = any(p.requires_grad for p in self.module.prior.parameters())
        n_train = (
            len(indexing[0])
            if external_indexing
            else math.ceil((1.0 if train_size is None else train_size) * self.adata.n_obs)
        )
        if prior_trains and gmm_init_method != "leiden" and n_train < self.module.n_centroids:
            raise ValueError(
                f"Cannot fit {self.module.n_centroids} mixture components to {n_train} training "
                f"cells (train_size={train_size} of {self.adata.n_obs}): lower n_centroids, or "
                "train on more cells (train_size=1.0 trains on every cell)."
            )
        if not 0 <= gmm_init_epoch < max_epochs:
            raise ValueError(
                f"gmm_init_epoch={gmm_init_epoch} must be in [0, max_epochs={max_epochs})."
            )
        if "gradient_clip_algorithm" in trainer_kwargs:
            raise ValueError(
                "gradient_clip_algorithm is not supported: gradient_clip_val always clips the "
                "total gradient norm, inside the optimizer's fused update. Drop "
                "gradient_clip_algorithm (and set gradient_clip_val=None for no clipping)."
            )
        if decoder_weight_decay is not None:
            if self._module_cls is not SCALEVAE:
                raise ValueError(
                    "decoder_weight_decay is an argument of the model of ATAC alone; with RNA "
                    "every network takes weight_decay. Leave decoder_weight_decay out."
                )
            validate_rate(decoder_weight_decay, "decoder_weight_decay")
        elif self._module_cls is SCALEVAE:
            decoder_weight_decay = default_decoder_weight_decay(
                self._open_cells_per_peak(), weight_decay
            )
        plan_kwargs = dict(plan_kwargs or {})
        _check_plan_kwargs(
            plan_kwargs,
            lr=lr,
            weight_decay=weight_decay,
            eps=eps,
            n_epochs_kl_warmup=n_epochs_kl_warmup,
        )
        plan_kwargs.update(
            {
                "optimizer": "Custom",
                "optimizer_creator": partial(
                    _make_optimizer,
                    self.module,
                    lr=lr,
                    eps=eps,
                    weight_decay=weight_decay,
                    decoder_weight_decay=decoder_weight_decay,
                    max_grad_norm=gradient_clip_val,
                ),
                "lr": lr,
                "weight_decay": weight_decay,
                "eps": eps,
                "n_epochs_kl_warmup": n_epochs_kl_warmup,
                "n_steps_kl_warmup": None,
            }
        )
        user_callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
        if load_sparse_tensor is None:
            load_sparse_tensor = _trains_on_cpu(accelerator)
        datasplitter_kwargs = self._drop_lone_last_cell(datasplitter_kwargs, n_train, batch_size)
        n_train_batches = math.ceil(n_train / batch_size)
        fit_kwargs = {
            "max_epochs": max_epochs,
            "accelerator": accelerator,
            "devices": devices,
            "train_size": train_size,
            "validation_size": validation_size,
            "batch_size": batch_size,
            "early_stopping": early_stopping,
            "load_sparse_tensor": load_sparse_tensor,
            "datasplitter_kwargs": datasplitter_kwargs,
            "plan_kwargs": plan_kwargs,
        }
        gmm_kwargs = {
            "latent_fn": self._gmm_latent_fn(batch_size, load_sparse_tensor),
            "n_components": self.module.n_centroids,
            "init_epoch": gmm_init_epoch,
            "seed": settings.seed,
            "method": gmm_init_method,
            "refit": gmm_refit,
        }
        # The held-out check of the experts comes before the mixture is fitted. When it
        # leaves an expert out, training starts again from the initial weights with that
        # expert off (see MultiSCALEVAE's select_experts): the check's own run ends there.
        check = None
        if prior_trains and getattr(self.module, "select_experts", False) and n_validation > 0:
            check = ExpertCheckCallback(
                self._heldout_fit_fn(batch_size, load_sparse_tensor),
                gmm_init_epoch,
                stop_if_changed=True,
            )
            initial_state = {k: v.clone() for k, v in self.module.state_dict().items()}
            # ... and from the random state the first run started from: the new start is the
            # run that an expert switched off from the first step makes.
            initial_rng = _torch_rng_state()
            # scvi-tools leaves the module in eval mode after training, and Lightning does not
            # switch it back: the new start gets each submodule's mode of the first.
            initial_modes = {name: m.training for name, m in self.module.named_modules()}
            trained_before = self.is_trained_
        fit = partial(
            self._fit,
            fit_kwargs,
            trainer_kwargs,
            user_callbacks,
            n_train_batches,
            prior_trains,
            gmm_kwargs,
        )
        result = fit(check)
        if check is not None and check.stopped:
            for m, on in zip(self.module.modalities, self.module.expert_active.tolist()):
                if not on:
                    warnings.warn(
                        check.left_out_message(m),
                        UserWarning,
                        stacklevel=settings.warnings_stacklevel,
                    )
            active = self.module.expert_active.clone()
            self.module.load_state_dict(initial_state)
            self.module.expert_active.copy_(active)
            for name, m in self.module.named_modules():
                m.train(initial_modes[name])
            self.is_trained_ = trained_before
            _set_torch_rng_state(initial_rng)
            logger.info("Training starts again from the initial weights with these experts.")
            result = fit(None)
        if check is not None:
            self.expert_check_ = check.report
        return result

    def _fit(
        self,
        fit_kwargs: dict,
        trainer_kwargs: dict,
        user_callbacks: list,
        n_train_batches: int,
        prior_trains: bool,
        gmm_kwargs: dict,
        check: ExpertCheckCallback | None,
    ):
        """One run of scvi-tools' ``train`` with this model's callbacks, of :meth:`train`."""
        callbacks = list(user_callbacks)
        if check is not None:
            callbacks.append(check)
        # A query model of load_query_data has the reference's prior frozen: keep it, so
        # that query cells are assigned to the reference's components.
        if prior_trains:
            callbacks.append(GMMInitCallback(**gmm_kwargs))
        guard = FiniteLossGuard(trained_before=self.is_trained_)
        interrupt = InterruptRecorder()
        callbacks += [guard, interrupt]
        kwargs = _quiet_trainer_kwargs(trainer_kwargs, n_train_batches, callbacks)
        try:
            with (
                flush_denormal(),
                sparse_minibatch_warnings_handled(),
                small_last_batch_warning_ignored(not self._has_batch_norm()),
            ):
                result = super().train(**fit_kwargs, callbacks=callbacks, **kwargs)
        except BaseException as error:
            self.module.eval()
            self.n_clusters_ = self.module.prior.n_active
            if guard.restored_epoch is not None:  # diverged, back at the end of that epoch
                self.is_trained_ = True
            stop = interrupt.interrupt_of(error)
            if stop is None:
                raise
            interrupt.finish(self)
            raise stop from None
        self.n_clusters_ = self.module.prior.n_active
        return result

    def _open_cells_per_peak(self) -> float:
        """Mean number of cells in which the peaks the model reads are open, in the data the
        model was set up on: counted by ``setup_anndata`` with the selection of the peaks
        and kept in the registry; counted here (block by block of cells) for a registry
        saved before it was kept."""
        key = self.module.registry_key(ATAC)
        stored = self.adata_manager.get_state_registry(key).get(OPEN_CELLS_KEY)
        if stored is not None:
            return float(stored)
        frac = open_fraction(self.adata_manager.get_from_registry(key))
        if self.module.peak_index is not None:
            frac = frac[self.module.peak_index.cpu().numpy()]
        return float(frac.mean() * self.adata.n_obs)

    def _has_batch_norm(self) -> bool:
        """Whether the module normalizes by minibatch anywhere (``use_batch_norm``), which
        needs at least two cells per training minibatch."""
        return any(isinstance(m, torch.nn.BatchNorm1d) for m in self.module.modules())

    def _drop_lone_last_cell(
        self, datasplitter_kwargs: dict | None, n_train: int, batch_size: int
    ) -> dict | None:
        """``drop_last=True`` when batch norm would get a last minibatch of one cell.

        Batch normalization cannot normalize a single cell in training (torch raises); when
        the training cells leave exactly one over after the full minibatches, that cell
        (a different one each epoch, as the minibatches are shuffled) sits the epoch out.
        """
        kwargs = dict(datasplitter_kwargs or {})
        if "drop_last" in kwargs or not self._has_batch_norm():
            return datasplitter_kwargs
        if n_train % batch_size == 1:
            kwargs["drop_last"] = True
            return kwargs
        return datasplitter_kwargs

    def _heldout_fit_fn(self, batch_size: int, load_sparse_tensor: bool):
        """The held-out check's fit, reading minibatches in the training's layout."""

        @torch.inference_mode()
        def fit_fn(indices: np.ndarray) -> np.ndarray:
            loader = self._make_data_loader(
                adata=self.adata,
                indices=indices,
                batch_size=batch_size,
                load_sparse_tensor=load_sparse_tensor,
            )
            means = torch.cat([self.module.heldout_product_mean(t).cpu() for t in loader])
            shared = means.nanmean(0)  # one latent for all the held-out cells
            fit = [self.module.heldout_fit(t, shared).cpu() for t in loader]
            return torch.cat(fit, -1).numpy()

        return fit_fn

    def _gmm_latent_fn(self, batch_size: int, load_sparse_tensor: bool):
        """The mixture fits' posterior moments, reading minibatches in the training's layout
        (on the CPU sparse ones: a minibatch of a wide peak matrix is not made dense)."""

        def latent_fn(indices: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            return self._posterior_moments(
                self.adata, indices, batch_size, load_sparse_tensor=load_sparse_tensor
            )

        return latent_fn

    # ------------------------------------------------------------------ outputs
    def _make_data_loader(
        self,
        adata: AnnData | MuData,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        shuffle: bool = False,
        data_loader_class=None,
        **data_loader_kwargs,
    ):
        """scvi-tools' data loader, with sparse minibatches by default when the module is on
        the CPU.

        The rule of ``train(load_sparse_tensor=None)``, for every loader made after
        training (the outputs): a sparse matrix is read as CSR minibatches on the CPU, so
        that a minibatch of a wide peak matrix is never made dense before the module cuts it
        to the peaks it reads (at 300,000 peaks this halves the time of
        :meth:`get_latent_representation`), and as dense ones on a GPU, where sparse-dense
        products are not deterministic. Pass ``load_sparse_tensor`` to choose; the fits made
        during training read the layout the training reads.
        """
        data_loader_kwargs.setdefault("load_sparse_tensor", self.module.device.type == "cpu")
        return super()._make_data_loader(
            adata,
            indices=indices,
            batch_size=batch_size,
            shuffle=shuffle,
            data_loader_class=data_loader_class,
            **data_loader_kwargs,
        )

    def _inference_outputs(
        self, adata: AnnData, indices, batch_size: int | None, **loader_kwargs
    ) -> Iterator[dict]:
        """The module's inference outputs of the cells given, minibatch by minibatch (the
        caller runs it under ``torch.inference_mode``)."""
        loader = self._make_data_loader(
            adata=adata, indices=indices, batch_size=batch_size, **loader_kwargs
        )
        for tensors in loader:
            yield self.module.inference(**self.module._get_inference_input(tensors))

    @torch.inference_mode()
    def _posterior_moments(
        self, adata, indices, batch_size, **loader_kwargs
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Means, variances and weights of the components of the aggregate posterior.

        One row per cell for ATAC alone; for RNA + ATAC, one per cell and mixture component
        it has, weighted by its weight in the cell's mixture, so that every cell counts
        once (see
        :meth:`~scale_scvi.module.SCALEModuleBase.aggregate_posterior_components`).
        """
        means, variances, weights = [], [], []
        for out in self._inference_outputs(adata, indices, batch_size, **loader_kwargs):
            qz_m, qz_v = self.module.aggregate_posterior_components(out)
            means.append(qz_m.cpu())
            variances.append(qz_v.cpu())
            weights.append(self.module.aggregate_posterior_weights(out).cpu())
        return tuple(torch.cat(t).numpy() for t in (means, variances, weights))

    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
        modality: Modality = "joint",
        joint_mean: Literal["mixture", "precision"] = "mixture",
        **kwargs,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Latent representation of each cell.

        Parameters
        ----------
        adata, indices, batch_size
            Cells to embed, as in scvi-tools.
        give_mean
            Posterior means (default) rather than one sample per cell.
        mc_samples
            Unused; kept for scvi-tools' signature.
        return_dist
            Return the posterior's ``(means, variances)`` instead.
        modality
            ``"joint"``: the posterior of all the modalities the model has (for RNA + ATAC
            the mixture of the experts of the modalities the cell has, and of their product
            with ``posterior="mopoe"``, whose mean is the weighted mean of their means);
            ``"atac"`` or ``"rna"``: that modality's posterior alone.
        joint_mean
            For ``modality="joint"`` of a model with both modalities: ``"mixture"`` (the
            mixture's own mean and variance) or ``"precision"`` (the normalized
            product of the experts the cell has, each weighted by its certainty; see
            :meth:`~scale_scvi.module.MultiSCALEVAE.precision_weighted_moments`). With one
            modality, or for one expert, both are the same.
        **kwargs
            Further arguments of :meth:`_make_data_loader` (scvi-tools' signature).

        Returns
        -------
        Array of shape ``(n_cells, n_latent)``, or the pair of means and variances.
        """
        if joint_mean not in ("mixture", "precision"):
            raise ValueError(
                f"joint_mean={joint_mean!r} is not one of 'mixture' (the mixture of experts' "
                "mean) and 'precision' (the precision-weighted product of the experts)."
            )
        self.module.check_modality(modality)
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        points, variances = [], []
        for out in self._inference_outputs(adata, indices, batch_size, **kwargs):
            qz_m, qz_v = self.module.latent_moments(out, modality, joint_mean)
            if return_dist or give_mean:
                point = qz_m
            elif modality == JOINT and joint_mean == "mixture":
                point = self.module.latent_sample(out, modality)
            else:
                point = qz_m + qz_v.sqrt() * torch.randn_like(qz_m)
            points.append(point.cpu())
            variances.append(qz_v.cpu())
        if return_dist:
            return torch.cat(points).numpy(), torch.cat(variances).numpy()
        return torch.cat(points).numpy()

    @torch.inference_mode()
    def get_cluster_probabilities(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        modality: Modality = "joint",
        n_samples: int = 1,
    ) -> np.ndarray:
        """Posterior cluster probabilities ``p(c | z)`` of each cell, one column per cluster.

        With ``n_samples=1`` (default) at the posterior mean of each cell; with more, the
        average of ``p(c | z_s)`` over ``n_samples`` draws ``z_s ~ q(z|x)``, which accounts
        for the uncertainty of the cell's position (a cell whose posterior straddles two
        components gets probabilities nearer to one half). ``modality`` picks the posterior
        of a multimodal model (see :meth:`get_latent_representation`); for ``"joint"`` at the
        mean the probabilities are averaged over the components of the mixture (with their
        weights), each at its posterior mean, and the draws are from the mixture.

        Returns
        -------
        Array of shape ``(n_cells, n_clusters_)`` whose rows sum to one; column ``j`` is
        cluster ``"j"`` of :meth:`get_cluster_assignments`.
        """
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
        self.module.check_modality(modality)
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        columns = torch.as_tensor(self._cluster_components(), device=self.device)
        probs = []
        for out in self._inference_outputs(adata, indices, batch_size):
            if n_samples == 1:
                p = self.module.posterior_cluster_probabilities(out, modality)
            else:
                p = sum(
                    self.module.cluster_probabilities(self.module.latent_sample(out, modality))
                    for _ in range(n_samples)
                )
                p = p / n_samples
            probs.append(p[:, columns].cpu())
        return torch.cat(probs).numpy()

    def get_cluster_assignments(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        return_confidence: bool = False,
        n_samples: int = 1,
        modality: Modality = "joint",
    ) -> pd.Categorical | pd.DataFrame:
        """The cluster of each cell: its most probable mixture component.

        Clusters are labelled ``"0"`` .. ``n_clusters_ - 1`` (the components left on after
        training, in order; see :attr:`n_clusters_`).

        Parameters
        ----------
        adata, indices, batch_size
            Cells to assign.
        return_confidence
            Also return, per cell, the probability of its cluster (``confidence``) and the
            entropy of its cluster probabilities in nats (``entropy``: 0 for a certain
            assignment, ``log(n_clusters_)`` for a uniform one).
        n_samples
            Average the probabilities over this many draws of ``q(z|x)`` (see
            :meth:`get_cluster_probabilities`); 1: at the posterior mean.
        modality
            The posterior of a multimodal model, as in :meth:`get_cluster_probabilities`.

        Returns
        -------
        A :class:`pandas.Categorical` of cluster labels (strings, ordered numerically; every
        cluster is a category even if no cell of ``adata`` falls in it), ready for
        ``adata.obs["scale_cluster"]``; with ``return_confidence``, a
        :class:`pandas.DataFrame` (indexed by cell) with columns ``cluster``,
        ``confidence`` and ``entropy``.
        """
        probs = self.get_cluster_probabilities(
            adata, indices, batch_size, modality=modality, n_samples=n_samples
        )
        labels = probs.argmax(1)
        categories = np.arange(probs.shape[1]).astype(str)
        clusters = pd.Categorical(labels.astype(str), categories=categories)
        if not return_confidence:
            return clusters
        entropy = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(1)
        names = self._validate_anndata(adata).obs_names
        names = names if indices is None else names[np.asarray(indices)]
        return pd.DataFrame(
            {
                "cluster": clusters,
                "confidence": probs[np.arange(len(labels)), labels],
                "entropy": np.maximum(entropy, 0.0),
            },
            index=names,
        )

    def get_cluster_specific_peaks(
        self,
        n_top: int | None = 100,
        components: Sequence[int] | None = None,
        rest: Literal["mean", "max"] = "mean",
        batch: str | None = None,
        adata: AnnData | None = None,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """Peaks that characterize each mixture component, read from the decoder.

        The mean ``mu_c`` of each component is decoded into peak probabilities
        (through the link), and peaks are ranked by ``p_c - p_rest``, their probability in
        the component minus that in the other components.

        Parameters
        ----------
        n_top
            Peaks returned per component (``None``: all).
        components
            Components to compare. Default: those that are the most probable component of at
            least one cell of ``adata`` (the clusters of :meth:`get_cluster_assignments`).
        rest
            ``"mean"`` compares with the mean of the other components; ``"max"`` with the most
            open of them (only peaks open in this component alone score high).
        batch
            Batch category at which to decode, for a model with ``batch_key`` (default: the
            first). Other categorical covariates take their first category, continuous ones
            their mean.
        adata, batch_size
            Cells that define the default ``components``.

        Returns
        -------
        :class:`pandas.DataFrame` with columns ``component`` (as in ``obs["scale_cluster"]``),
        ``peak``, ``rank``, ``p_component``, ``p_rest``, ``score`` and ``log2_fold_change``.
        """
        self._check_if_trained(warn=False)
        if components is None:
            components = _peaks.used_components(self, adata, batch_size)
        components = [int(c) for c in components]
        bad = [c for c in components if not 0 <= c < self.n_clusters_]
        if bad:
            raise ValueError(
                f"components {bad} are out of range: the model has {self.n_clusters_} "
                "clusters (labels 0 .. n_clusters_ - 1)."
            )
        names = feature_names(self, adata, ATAC)
        probs = _peaks.component_accessibility(self, components, batch=batch)
        return _peaks.rank_specific_peaks(probs, components, names, n_top=n_top, rest=rest)

    @torch.inference_mode()
    def get_elbo(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
        **kwargs,
    ) -> float | np.ndarray:
        """The ELBO, with scvi-tools' sign convention: the bound itself, higher is better.

        Whatever the training objective, this is the module's ``objective="elbo"`` bound, a
        lower bound on ``log p(x)`` and, in expectation, at most :meth:`get_marginal_ll`,
        which estimates ``log p(x)`` itself. What it computes depends on the module:

        - ATAC alone (:class:`~scale_scvi.module.SCALEVAE`): SCALE's closed-form ELBO of the
          GMM-prior model with the module's ``q(c|x)`` (``gamma_from``), its reconstruction
          term estimated with one sample of ``q(z|x)``.
        - RNA and/or ATAC in a MuData (:class:`~scale_scvi.module.MultiSCALEVAE`): the
          stratified Monte-Carlo ELBO of the mixture posterior with the exact
          mixture prior (``n_particles`` samples per component), with the training
          objective's ``likelihood_scale`` weights.

        The two are different estimators: compare values only between models of the same
        module. (The ``elbo_train``/``elbo_validation`` columns of ``history`` are the
        opposite: losses, lower is better.) See the math page of the documentation.

        With ``depth_offset=True`` (the default) the ATAC term is a conditional
        pseudo-likelihood given each cell's observed depth (read from the cell itself, as
        scVI's observed library size): the bound is then on a quantity that is not a
        normalized ``log p(x)`` (its Bernoulli terms do not sum to one over ``x``) and is
        comparable only between models with the same setting on the same peaks. A model with
        ``depth_offset=False`` bounds the normalized ``log p(x)``, comparable across models and
        tools (math page, section 1).

        Parameters
        ----------
        adata, indices, batch_size
            Cells to evaluate.
        return_mean
            Mean over cells (default) or one value per cell.

        Returns
        -------
        The mean ELBO as a float, or an array with one value per cell (nats, summed over peaks).
        """
        loss_kwargs = {"objective": "elbo", **kwargs.pop("loss_kwargs", {})}
        values = super().get_elbo(
            adata=adata,
            indices=indices,
            batch_size=batch_size,
            return_mean=return_mean,
            loss_kwargs=loss_kwargs,
            **kwargs,
        )
        values = torch.as_tensor(values).detach().cpu()
        return float(values) if return_mean else values.numpy()

    @torch.inference_mode()
    def get_marginal_ll(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_mc_samples: int = 100,
        batch_size: int | None = None,
        return_mean: bool = True,
        n_mc_samples_per_pass: int | None = None,
    ) -> float | np.ndarray:
        """Importance-sampled estimate of the marginal log-likelihood ``log p(x)``.

        The log-likelihood itself (not its negative): higher is better. Per cell,
        ``log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x)`` with ``K = n_mc_samples`` particles
        ``z_k ~ q(z|x)`` and the exact Gaussian-mixture density ``p(z)``, whatever the
        training objective. Its expectation is the IWAE bound: at least the ELBO of
        :meth:`get_elbo`, never decreasing in ``K``, and converging to ``log p(x)``.

        With ``depth_offset=True`` (the default), ``p(x|z)`` is the conditional
        pseudo-likelihood given each cell's observed depth, not normalized over ``x``: the
        estimate is then of that quantity, comparable only between models with the same
        setting on the same peaks; ``depth_offset=False`` gives the normalized ``log p(x)``,
        comparable across models and tools (math page, section 1).

        Parameters
        ----------
        adata, indices, batch_size
            Cells to evaluate.
        n_mc_samples
            Importance samples per cell.
        return_mean
            Mean over cells (default) or an array with one value per cell.
        n_mc_samples_per_pass
            Samples decoded at a time, to bound memory (default: the module's
            ``particle_chunk_size``).

        Returns
        -------
        The mean as a float, or an array with one value per cell (nats, summed over peaks).
        """
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        loader = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)
        values = torch.cat(
            [
                self.module.marginal_ll(
                    t, n_mc_samples=n_mc_samples, n_mc_samples_per_pass=n_mc_samples_per_pass
                ).cpu()
                for t in loader
            ]
        ).numpy()
        return float(values.mean()) if return_mean else values
