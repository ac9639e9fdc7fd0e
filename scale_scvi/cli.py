"""The ``scale-scvi`` command: cluster a single-cell ATAC-seq dataset in one run.

Reads a peak matrix (``.h5ad``, a 10x-style folder or an ``.h5mu``), filters cells and
peaks, trains SCALE, and writes an output folder with the annotated AnnData, the saved model
and figures. The input file is never modified.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

_OUTPUTS = """\
output folder (-o):
  adata.h5ad                  the filtered cells x peaks (for RNA + ATAC input: the ATAC
                              part, and mdata.h5mu holds both) with obsm["X_scale"] (latent means),
                              obsm["scale_probabilities"], obs["scale_cluster"] (argmax of the
                              cluster probabilities), obs["leiden"], obsm["X_umap"], and
                              layers["scale_imputed"] / layers["scale_binary"] with --impute /
                              --binary
  model/                      the trained model (scale_scvi.SCALE.load("model", adata=...))
  umap.png                    UMAP of the latent space coloured by cluster
  training_curves.png         loss curves of the training run
  cluster_specific_peaks.csv  top peaks of each cluster, from the decoder

examples:
  scale-scvi peaks.h5ad -o results --n-centroids 8
  scale-scvi filtered_peak_bc_matrix/ -o results --min-peaks 200 --min-cells 10
  scale-scvi multiome.h5mu --modality atac -o results --impute --binary
  scale-scvi multiome.h5mu -o results     # 'atac' + 'rna' modalities: joint model
"""


MULTIMODAL = ("atac", "rna")


class CLIError(Exception):
    """An error to report to the user in one line, without a traceback."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _devices(text: str) -> int | str:
    if text == "auto":
        return text
    return _positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``scale-scvi``."""
    parser = _Parser(
        prog="scale-scvi",
        description=(
            "Cluster single-cell ATAC-seq data with SCALE (a VAE with a Gaussian-mixture\n"
            "prior) on scvi-tools and write a folder of results. The input is read into\n"
            "memory and never modified."
        ),
        epilog=_OUTPUTS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "input",
        help="cells x peaks .h5ad file, 10x-style folder (matrix.mtx[.gz], peaks.bed[.gz] or "
        "features.tsv[.gz], barcodes.tsv[.gz]) or .h5mu file",
    )
    parser.add_argument(
        "-o", "--outdir", required=True, metavar="DIR", help="output folder (created if needed)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="write into an output folder that holds results"
    )
    io = parser.add_argument_group("input")
    io.add_argument(
        "--modality",
        metavar="NAME",
        help="modality of an .h5mu file holding the peaks (e.g. 'atac'); without it, an .h5mu "
        "with 'atac' and 'rna' modalities trains the joint RNA + ATAC model",
    )
    io.add_argument("--layer", metavar="NAME", help="layer holding the peak counts (default: X)")
    io.add_argument("--batch-key", metavar="KEY", help="column of obs with the batch of each cell")
    filters = parser.add_argument_group("filters (on a copy in memory)")
    filters.add_argument(
        "--min-peaks",
        metavar="N",
        type=_non_negative_int,
        default=100,
        help="keep cells with at least this many open peaks (default: %(default)s)",
    )
    filters.add_argument(
        "--min-cells",
        metavar="N",
        type=_non_negative_int,
        default=3,
        help="keep peaks open in at least this many cells (default: %(default)s)",
    )
    filters.add_argument(
        "--n-top-peaks",
        metavar="N",
        type=_positive_int,
        default=None,
        help="then keep only the N most often open peaks, the most variable ones for "
        "binary data (default: all)",
    )
    model = parser.add_argument_group("model and training")
    model.add_argument(
        "-k",
        "--n-centroids",
        metavar="K",
        type=_positive_int,
        default=30,
        help="number of mixture components, i.e. clusters (default: %(default)s)",
    )
    model.add_argument(
        "--n-latent",
        metavar="N",
        type=_positive_int,
        default=10,
        help="latent dimensions (default: %(default)s)",
    )
    model.add_argument(
        "--max-epochs",
        metavar="N",
        type=_positive_int,
        default=None,
        help="training epochs (default: about 60,000 cell updates, 30 to 400 epochs)",
    )
    model.add_argument(
        "--batch-size",
        metavar="N",
        type=_positive_int,
        default=128,
        help="minibatch size (default: %(default)s)",
    )
    model.add_argument(
        "--lr",
        metavar="LR",
        type=_positive_float,
        default=1e-3,
        help="learning rate (default: %(default)s)",
    )
    model.add_argument(
        "--seed", metavar="N", type=int, default=0, help="random seed (default: %(default)s)"
    )
    model.add_argument(
        "--accelerator",
        default="auto",
        choices=["auto", "cpu", "gpu", "cuda", "mps"],
        help="Lightning accelerator (default: %(default)s)",
    )
    model.add_argument(
        "--devices",
        metavar="N",
        type=_devices,
        default="auto",
        help="number of devices (default: auto)",
    )
    out = parser.add_argument_group("outputs")
    out.add_argument(
        "--impute",
        action="store_true",
        help="store the imputed accessibility (probabilities >= --threshold, sparse) in "
        "layers['scale_imputed']",
    )
    out.add_argument(
        "--binary",
        action="store_true",
        help="store the binarized imputation (1 where the probability >= --threshold) in "
        "layers['scale_binary']",
    )
    out.add_argument(
        "--threshold",
        metavar="P",
        type=_probability,
        default=0.5,
        help="probability threshold of --impute and --binary (default: %(default)s)",
    )
    out.add_argument(
        "--resolution",
        metavar="R",
        type=_positive_float,
        default=1.0,
        help="Leiden resolution (default: %(default)s)",
    )
    out.add_argument(
        "--n-top-specific",
        metavar="N",
        type=_positive_int,
        default=50,
        help="peaks per cluster in cluster_specific_peaks.csv (default: %(default)s)",
    )
    parser.add_argument(
        "--no-progress-bar", action="store_true", help="do not show the training progress bar"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback when something fails"
    )
    return parser


class _Log:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)


def read_input(path: str, modality: str | None):
    """Read the input into memory: an AnnData, or a MuData for a multimodal run.

    An ``.h5mu`` file with ``atac`` and ``rna`` modalities and no ``modality`` gives the
    MuData (RNA + ATAC); with ``modality``, that modality's AnnData.
    """
    import anndata as ad

    from scale_scvi.data import read_10x_folder

    source = Path(path)
    if not source.exists():
        raise CLIError(f"input {path!r} does not exist")
    if source.is_dir():
        if modality is not None:
            raise CLIError("--modality applies to .h5mu input, not to a 10x-style folder")
        try:
            adata = read_10x_folder(source)
        except (FileNotFoundError, ValueError) as err:
            raise CLIError(str(err)) from err
        if "feature_types" in adata.var and adata.var["feature_types"].nunique() > 1:
            types = sorted(adata.var["feature_types"].unique())
            if "Peaks" not in types:
                raise CLIError(f"the folder mixes feature types {types} and has no 'Peaks'")
            adata = adata[:, (adata.var["feature_types"] == "Peaks").to_numpy()].copy()
        return adata
    suffix = source.suffix.lower()
    if suffix == ".h5ad":
        if modality is not None:
            raise CLIError("--modality applies to .h5mu input, not to .h5ad")
        try:
            return ad.read_h5ad(source)
        except Exception as err:  # h5py/anndata raise several types for unreadable files
            raise CLIError(f"cannot read {path!r} as an .h5ad file ({_one_line(err)})") from err
    if suffix == ".h5mu":
        import mudata as md

        try:
            mdata = md.read_h5mu(source)
        except Exception as err:
            raise CLIError(f"cannot read {path!r} as an .h5mu file ({_one_line(err)})") from err
        if modality is None:
            if set(MULTIMODAL) <= set(mdata.mod):
                return mdata
            raise CLIError(
                f"{path!r} is an .h5mu file without both 'atac' and 'rna' modalities: pass "
                f"--modality with the modality holding the peaks (one of {list(mdata.mod)})"
            )
        if modality not in mdata.mod:
            raise CLIError(
                f"--modality {modality!r} is not in {path!r} (modalities: {list(mdata.mod)})"
            )
        return mdata.mod[modality].copy()
    raise CLIError(f"input {path!r} is not an .h5ad file, an .h5mu file or a 10x-style folder")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if text else type(err).__name__


def _binary(matrix):
    import numpy as np
    import scipy.sparse as sp

    return (
        (sp.csr_matrix(matrix) > 0)
        if sp.issparse(matrix)
        else sp.csr_matrix(np.asarray(matrix) > 0)
    )


def _filter_masks(adata, min_peaks: int, min_cells: int, n_top_peaks: int | None, layer):
    """Boolean masks of the cells and peaks kept by the filters."""
    import numpy as np

    from scale_scvi.model._validation import get_matrix, validate_accessibility_matrix

    try:
        matrix = get_matrix(adata, layer)
        validate_accessibility_matrix(matrix, "the input matrix")
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from err
    binary = _binary(matrix)
    peaks_per_cell = np.asarray(binary.sum(1)).ravel()
    cells = peaks_per_cell >= min_peaks
    if not cells.any():
        raise CLIError(
            f"no cell has at least --min-peaks {min_peaks} open peaks (the most is "
            f"{int(peaks_per_cell.max())}); lower --min-peaks"
        )
    cells_per_peak = np.asarray(binary[cells].sum(0)).ravel()
    peaks = cells_per_peak >= min_cells
    if not peaks.any():
        raise CLIError(f"no peak is open in at least --min-cells {min_cells} cells; lower it")
    if n_top_peaks is not None and n_top_peaks < peaks.sum():
        order = np.argsort(-np.where(peaks, cells_per_peak, -1), kind="stable")
        peaks = np.zeros_like(peaks)
        peaks[order[:n_top_peaks]] = True
    return cells, peaks


def filter_data(adata, min_peaks: int, min_cells: int, n_top_peaks: int | None, layer, log):
    """Filter a copy of the data: cells with few open peaks, rarely open peaks, top peaks."""
    cells, peaks = _filter_masks(adata, min_peaks, min_cells, n_top_peaks, layer)
    log(
        f"Kept {int(cells.sum())} of {adata.n_obs} cells (>= {min_peaks} open peaks) and "
        f"{int(peaks.sum())} of {adata.n_vars} peaks."
    )
    return adata[cells, peaks].copy()


def filter_mudata(mdata, min_peaks: int, min_cells: int, n_top_peaks: int | None, log):
    """Filter a copy of RNA + ATAC data: cells and peaks on ATAC, genes seen in few cells."""
    import numpy as np
    from mudata import MuData

    atac, rna = (mdata.mod[m] for m in MULTIMODAL)
    if not atac.obs_names.equals(rna.obs_names):
        raise CLIError(
            "the 'atac' and 'rna' modalities must hold the same cells in the same order "
            "(all-zero rows for cells that lack one)"
        )
    cells, peaks = _filter_masks(atac, min_peaks, min_cells, n_top_peaks, None)
    genes = np.asarray(_binary(rna.X)[cells].sum(0)).ravel() >= min_cells
    if not genes.any():
        raise CLIError(f"no gene is detected in at least --min-cells {min_cells} cells")
    out = MuData({"atac": atac[cells, peaks].copy(), "rna": rna[cells, genes].copy()})
    shared = [c for c in mdata.obs.columns if ":" not in c]
    for column in shared:
        out.obs[column] = mdata.obs[column].to_numpy()[cells]
    log(
        f"Kept {int(cells.sum())} of {mdata.n_obs} cells (>= {min_peaks} open peaks), "
        f"{int(peaks.sum())} of {atac.n_vars} peaks and {int(genes.sum())} of {rna.n_vars} genes."
    )
    return out


def run(args: argparse.Namespace) -> Path:
    """Run the whole workflow for parsed arguments; return the output folder."""
    log = _Log(args.quiet)
    outdir = Path(args.outdir)
    if outdir.exists() and not outdir.is_dir():
        raise CLIError(f"output {str(outdir)!r} exists and is not a folder")
    if (outdir / "adata.h5ad").exists() and not args.overwrite:
        raise CLIError(f"{str(outdir)!r} already holds results; pass --overwrite or another -o")
    if not (args.impute or args.binary) and args.threshold != 0.5:
        raise CLIError("--threshold applies to --impute and --binary; pass one of them")

    from mudata import MuData

    t0 = time.perf_counter()
    log(f"Reading {args.input} ...")
    data = read_input(args.input, args.modality)
    multimodal = isinstance(data, MuData)
    log(f"Read {data.n_obs} cells x {data.n_vars} features.")
    if multimodal and args.layer is not None:
        raise CLIError("--layer applies to AnnData input; RNA + ATAC input uses each X")
    if args.batch_key is not None and args.batch_key not in data.obs:
        raise CLIError(
            f"--batch-key {args.batch_key!r} is not a column of obs (columns: "
            f"{list(data.obs.columns)})"
        )
    if multimodal:
        data = filter_mudata(data, args.min_peaks, args.min_cells, args.n_top_peaks, log)
    else:
        data = filter_data(data, args.min_peaks, args.min_cells, args.n_top_peaks, args.layer, log)
    if args.n_centroids > data.n_obs:
        raise CLIError(
            f"--n-centroids {args.n_centroids} is larger than the number of cells left "
            f"({data.n_obs})"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc
    import scvi

    from scale_scvi import SCALE, pl

    scvi.settings.seed = args.seed
    try:
        if multimodal:
            SCALE.setup_mudata(
                data,
                batch_key=args.batch_key,
                modalities={"atac_layer": "atac", "rna_layer": "rna"},
            )
        else:
            SCALE.setup_anndata(data, layer=args.layer, batch_key=args.batch_key)
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from err
    model = SCALE(data, n_centroids=args.n_centroids, n_latent=args.n_latent)
    what = "RNA + ATAC" if multimodal else "ATAC"
    log(
        f"Training SCALE on {what} ({args.n_centroids} components, {args.n_latent} latent "
        "dimensions) ..."
    )
    model.train(
        max_epochs=args.max_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        accelerator=args.accelerator,
        devices=args.devices,
        enable_progress_bar=not (args.no_progress_bar or args.quiet),
    )
    outdir.mkdir(parents=True, exist_ok=True)

    log("Writing the latent space, clusters, UMAP and Leiden clusters ...")
    # The annotated AnnData: the data itself, or the ATAC modality with the cells' obs.
    adata = data
    if multimodal:
        adata = data.mod["atac"].copy()
        for column in data.obs.columns:
            if ":" not in column:
                adata.obs[column] = data.obs[column].to_numpy()
    adata.obsm["X_scale"] = model.get_latent_representation()
    adata.obsm["scale_probabilities"] = model.get_cluster_probabilities()
    adata.obs["scale_cluster"] = model.get_cluster_assignments()
    sc.pp.neighbors(adata, use_rep="X_scale", random_state=args.seed)
    sc.tl.umap(adata, random_state=args.seed)
    sc.tl.leiden(
        adata,
        resolution=args.resolution,
        random_state=args.seed,
        flavor="igraph",
        n_iterations=2,
        directed=False,
    )
    if args.impute or args.binary:
        imputed = model.get_normalized_accessibility(threshold=args.threshold)
        if args.impute:
            adata.layers["scale_imputed"] = imputed
        if args.binary:
            binary = imputed.copy()
            binary.data[:] = 1.0
            adata.layers["scale_binary"] = binary
    peaks = (
        model.get_cluster_specific_peaks(n_top=args.n_top_specific)
        if (adata.obs["scale_cluster"].nunique() > 1)
        else None
    )

    fig = sc.pl.umap(
        adata, color=["scale_cluster", "leiden"], show=False, return_fig=True, wspace=0.35
    )
    fig.savefig(outdir / "umap.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    axes = pl.training_curves(model, show=False)
    axes[0].figure.savefig(outdir / "training_curves.png", dpi=120, bbox_inches="tight")
    plt.close(axes[0].figure)
    if peaks is not None:
        peaks.to_csv(outdir / "cluster_specific_peaks.csv", index=False)
    else:
        log("All cells fell into one cluster: no cluster-specific peaks to write.")
    adata.write_h5ad(outdir / "adata.h5ad")
    if multimodal:
        for key in ("X_scale", "scale_probabilities", "X_umap"):
            data.obsm[key] = adata.obsm[key]
        for column in ("scale_cluster", "leiden"):
            data.obs[column] = adata.obs[column].to_numpy()
        data.write_h5mu(outdir / "mdata.h5mu")
    model.save(outdir / "model", overwrite=True)
    n_clusters = adata.obs["scale_cluster"].nunique()
    log(
        f"Done in {time.perf_counter() - t0:.0f} s: {n_clusters} SCALE clusters, "
        f"{adata.obs['leiden'].nunique()} Leiden clusters. Results in {outdir}/"
    )
    return outdir


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scale-scvi`` console script; returns the exit status."""
    # Transparent huge pages for PyTorch's large CPU allocations; read once, when torch
    # starts, which is after this line (docs/scaling.md). THP_MEM_ALLOC_ENABLE=0 opts out.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        warnings.filterwarnings("ignore")
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
        logging.getLogger("scvi").setLevel(logging.WARNING)
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
    try:
        run(args)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except CLIError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        if args.debug:
            raise
        print(
            f"{parser.prog}: error: {type(err).__name__}: {_one_line(err)} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
