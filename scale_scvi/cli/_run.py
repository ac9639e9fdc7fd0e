"""The workflow of ``scale-scvi``: read, filter, train, save, annotate, write."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import scipy.sparse as sp
from anndata import AnnData
from mudata import MuData

from . import _outputs as out
from ._errors import CLIError, from_library
from ._input import filter_data, obs_columns, read_input, shared_columns
from ._parser import given
from ._progress import RunTimeNotice

DEFAULT_THRESHOLD = 0.5  # of --impute / --binary (the library keeps probabilities otherwise)


@dataclass
class Run:
    """What a run has written so far, for the final or the error message."""

    outdir: Path
    written: list[str] = field(default_factory=list)

    @property
    def model_saved(self) -> bool:
        return out.MODEL in self.written


class Log:
    """One-line progress messages on stderr, unless quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)


def _check_options(args: argparse.Namespace, data: AnnData | MuData) -> None:
    """Checks of CLI-only options, done before training so that no run is lost to them."""
    if isinstance(data, MuData) and hasattr(args, "layer"):
        raise CLIError("--layer applies to AnnData input; RNA + ATAC input uses each X")
    missing = [key for key in args.color if key not in obs_columns(data)]
    if missing:
        raise CLIError(
            f"--color {missing[0]!r} is not a column of obs (columns: {obs_columns(data)})"
        )


def _train(data: AnnData | MuData, args: argparse.Namespace, log: Log):
    import scvi

    from scale_scvi import SCALE

    multimodal = isinstance(data, MuData)
    scvi.settings.seed = args.seed  # 0 unless given: a run can be repeated
    try:
        if multimodal:
            SCALE.setup_mudata(
                data,
                modalities={"atac_layer": "atac", "rna_layer": "rna"},
                **given(args, batch_key="batch_key"),
            )
        else:
            SCALE.setup_anndata(data, **given(args, layer="layer", batch_key="batch_key"))
        model = SCALE(
            data,
            **given(args, n_centroids="n_centroids", n_latent="n_latent", atac_link="atac_link"),
        )
    except (ValueError, TypeError) as err:
        raise from_library(err) from err
    train_kwargs = given(
        args,
        max_epochs="max_epochs",
        batch_size="batch_size",
        lr="lr",
        accelerator="accelerator",
        devices="devices",
    )
    if args.no_progress_bar or args.quiet:
        train_kwargs["enable_progress_bar"] = False
    what = "RNA + ATAC" if multimodal else "ATAC"
    # What the model reads: the peaks setup chose (and every gene), not the whole matrix.
    n_read = len(model.selected_peaks_) if model.selected_peaks_ is not None else 0
    if multimodal:
        n_read += data.mod["rna"].n_vars
    n_lsi = getattr(model.module, "n_lsi", None)
    encoder = f"; the encoder reads {n_lsi} LSI coordinates of them" if n_lsi else ""
    log(
        f"Training SCALE on {what} ({data.n_obs:,} cells x {n_read:,} features read of "
        f"{data.n_vars:,}{encoder}) ..."
    )
    try:
        model.train(callbacks=[RunTimeNotice(n_read, log)], **train_kwargs)
    except (ValueError, TypeError) as err:
        raise from_library(err) from err
    return model


def _annotate(model, data: AnnData | MuData, args: argparse.Namespace) -> AnnData:
    """The AnnData written as adata.h5ad: latent, clusters, neighbours, UMAP, Leiden."""
    import scanpy as sc

    adata = data
    if isinstance(data, MuData):
        adata = data.mod["atac"].copy()
        for column in shared_columns(data):
            adata.obs[column] = data.obs[column].to_numpy()
    adata.obsm["X_scale"] = model.get_latent_representation()
    adata.obsm["scale_probabilities"] = model.get_cluster_probabilities()
    adata.obs["scale_cluster"] = model.get_cluster_assignments()
    # which peaks the model reads (setup_anndata / setup_mudata chose them)
    adata.var["scale_selected"] = adata.var_names.isin(model.selected_peaks_)
    seed = {"random_state": args.seed}
    # scanpy 1.11 builds the graph of >= 8,192 cells with pynndescent, whose sparse result
    # scipy >= 1.17 no longer gives `getnnz` ("'csr_array' object has no attribute
    # 'getnnz'"). scikit-learn's exact k-nearest neighbours avoid that path, and are fast on
    # the few latent dimensions (0.5 s for 12,000 cells x 10 dimensions).
    sc.pp.neighbors(adata, use_rep="X_scale", transformer="sklearn", **seed)
    sc.tl.umap(adata, **seed)
    sc.tl.leiden(
        adata,
        flavor="igraph",
        n_iterations=2,
        directed=False,
        **given(args, resolution="resolution"),
        **seed,
    )
    if args.impute or args.binary:
        imputed = model.get_normalized_accessibility(
            threshold=args.threshold if args.threshold is not None else DEFAULT_THRESHOLD
        )
        imputed = _over_all_peaks(imputed, adata, model.selected_peaks_)
        if args.impute:
            adata.layers["scale_imputed"] = imputed
        if args.binary:
            binary = imputed.copy()
            binary.data[:] = 1.0
            adata.layers["scale_binary"] = binary
    return adata


def _over_all_peaks(imputed, adata: AnnData, selected) -> sp.csr_matrix:
    """The imputation (over the peaks the model reads) in the columns of ``adata``.

    Peaks that ``setup_anndata`` did not select have no imputation: their columns stay
    empty, and ``adata.var["scale_selected"]`` says which peaks were read.
    """
    if imputed.shape[1] == adata.n_vars:
        return imputed
    columns = adata.var_names.get_indexer(selected)
    full = sp.csr_matrix(
        (imputed.data, columns[imputed.indices], imputed.indptr),
        shape=(adata.n_obs, adata.n_vars),
    )
    full.sort_indices()
    return full


def _figures(model, adata: AnnData, args: argparse.Namespace, state: Run) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    from scale_scvi import pl

    color = ["scale_cluster", "leiden", *dict.fromkeys(args.color)]
    fig = sc.pl.umap(adata, color=color, show=False, return_fig=True, wspace=0.35)
    _write(state, out.UMAP, lambda p: fig.savefig(p, dpi=120, bbox_inches="tight"))
    plt.close(fig)
    curves = pl.training_curves(model, show=False)[0].figure
    _write(state, out.CURVES, lambda p: curves.savefig(p, dpi=120, bbox_inches="tight"))
    plt.close(curves)


def _write(state: Run, name: str, write) -> None:
    out.write_atomic(state.outdir / name, write)
    state.written.append(name)


def run(args: argparse.Namespace, state: Run, log: Log) -> None:
    """Run the whole workflow for parsed arguments; ``state`` records what was written."""
    outdir, source = state.outdir, Path(args.input)
    out.check_folder(outdir, source, args.overwrite)
    if args.threshold is not None and not (args.impute or args.binary):
        raise CLIError("--threshold applies to --impute and --binary; pass one of them")
    t0 = time.perf_counter()
    data = read_input(args.input, args.modality)
    log(f"Read {data.n_obs} cells x {data.n_vars} features from {args.input}.")
    _check_options(args, data)
    data = filter_data(
        data,
        given(args, min_peaks="min_peaks"),
        given(args, min_cells="min_cells", n_top="n_top_peaks"),
        getattr(args, "layer", None),
        log,
    )
    model = _train(data, args, log)

    # The model first, so that a failure downstream loses no training.
    outdir.mkdir(parents=True, exist_ok=True)
    if args.overwrite:
        removed = out.clear_outputs(outdir)
        if removed:
            log(f"Removed the previous {', '.join(removed)} from {outdir}.")
    _write(state, out.MODEL, lambda p: model.save(p, overwrite=True))
    log(f"Saved the model in {outdir / out.MODEL}.")

    log("Computing the latent space, clusters, neighbour graph, UMAP and Leiden clusters ...")
    adata = _annotate(model, data, args)
    n_clusters = adata.obs["scale_cluster"].nunique()
    if n_clusters > 1:
        peaks = model.get_cluster_specific_peaks(**given(args, n_top="n_top_specific"))
        _write(state, out.PEAKS, lambda p: peaks.to_csv(p, index=False))
    else:
        log("All cells fell into one cluster: no cluster-specific peaks to write.")
    _figures(model, adata, args, state)
    _write(state, out.ADATA, adata.write_h5ad)
    if isinstance(data, MuData):
        for key in ("X_scale", "scale_probabilities", "X_umap"):
            data.obsm[key] = adata.obsm[key]
        for column in ("scale_cluster", "leiden"):
            data.obs[column] = adata.obs[column].to_numpy()
        data.mod["atac"].var["scale_selected"] = adata.var["scale_selected"].to_numpy()
        _write(state, out.MDATA, data.write_h5mu)
    n_leiden = adata.obs["leiden"].nunique()
    log(
        f"Done in {time.perf_counter() - t0:.0f} s: {_count(n_clusters, 'SCALE cluster')}, "
        f"{_count(n_leiden, 'Leiden cluster')}. Results in {outdir}/"
    )


def _count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: '1 SCALE cluster', '8 SCALE clusters'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
