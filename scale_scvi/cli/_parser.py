"""The argument parser of ``scale-scvi``.

Every option that the library also has is left out of the parsed arguments unless the user
gives it (``default=argparse.SUPPRESS``): the library's signature defaults are the only
defaults.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

OUTPUTS_HELP = """\
output folder (-o):
  adata.h5ad                  the cells x peaks after the filters (for RNA + ATAC input: the
                              ATAC part, and mdata.h5mu holds both) with obsm["X_scale"]
                              (latent means), obsm["scale_probabilities"], obs["scale_cluster"]
                              (the model's clusters), obs["leiden"], obsm["X_umap"], the
                              neighbour graph, and layers["scale_imputed"] / ["scale_binary"]
                              with --impute / --binary
  model/                      the trained model (scale_scvi.SCALE.load("model", adata=...)),
                              saved as soon as training ends
  umap.png                    UMAP of the latent space coloured by cluster (and --color)
  training_curves.png         loss curves of the training run
  cluster_specific_peaks.csv  top peaks of each cluster, from the decoder
The folder may hold other files; any of these names in it needs --overwrite, which removes
exactly these before writing. Progress and messages go to stderr.

examples:
  scale-scvi peaks.h5ad -o results
  scale-scvi filtered_peak_bc_matrix.h5 -o results --n-centroids 8 --color cell_type
  scale-scvi filtered_peak_bc_matrix/ -o results --min-peaks 200 --min-cells 10
  scale-scvi filtered_feature_bc_matrix.h5 -o results   # 10x ARC multiome: joint model
  scale-scvi multiome.h5mu --modality atac -o results --impute --binary
"""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(
    kind: type, description: str, accept: Callable[[float], bool], words: tuple[str, ...] = ()
) -> Callable[[str], int | float | str]:
    """An argparse ``type``: ``text`` as ``kind`` if ``accept(value)``, or one of ``words``."""

    def parse(text: str):
        if text in words:
            return text
        try:
            value = kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not (math.isfinite(value) and accept(value)):
            raise argparse.ArgumentTypeError(f"must be {description}, got {text}")
        return value

    return parse


_INT = number(int, "an integer", lambda v: True)
_COUNT = number(int, "a positive integer", lambda v: v >= 1)
_NON_NEGATIVE = number(int, "an integer >= 0", lambda v: v >= 0)
_POSITIVE = number(float, "a positive number", lambda v: v > 0)
_PROBABILITY = number(float, "between 0 and 1", lambda v: 0 < v < 1)
_DEVICES = number(int, "a positive integer or 'auto'", lambda v: v >= 1, words=("auto",))
_LIBRARY = {"default": argparse.SUPPRESS}  # not passed unless given: the library decides


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``scale-scvi``."""
    parser = Parser(
        prog="scale-scvi",
        description=(
            "Cluster single-cell ATAC-seq data with SCALE (a VAE with a Gaussian-mixture\n"
            "prior) on scvi-tools and write a folder of results. The input is read into\n"
            "memory and never modified. Options not given take the library's defaults\n"
            "(scale_scvi.pp, scale_scvi.SCALE and SCALE.train)."
        ),
        epilog=OUTPUTS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "input",
        help="cells x peaks .h5ad file, 10x Genomics .h5 matrix (peaks, or ARC multiome), "
        "10x-style folder (matrix.mtx[.gz], peaks.bed[.gz] or features.tsv[.gz], "
        "barcodes.tsv[.gz]) or .h5mu file",
    )
    parser.add_argument(
        "-o", "--outdir", required=True, metavar="DIR", help="output folder (created if needed)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace this tool's outputs in the folder (only those files are removed)",
    )
    io = parser.add_argument_group("input")
    io.add_argument(
        "--modality",
        metavar="NAME",
        help="modality holding the peaks in an .h5mu or ARC .h5 file (e.g. 'atac'); without "
        "it, input with 'atac' and 'rna' modalities trains the joint RNA + ATAC model",
    )
    io.add_argument(
        "--layer", metavar="NAME", help="layer holding the peak counts (default: X)", **_LIBRARY
    )
    io.add_argument(
        "--batch-key", metavar="KEY", help="column of obs with the batch of each cell", **_LIBRARY
    )
    filters = parser.add_argument_group("filters (scale_scvi.pp, on a copy in memory)")
    filters.add_argument(
        "--min-peaks",
        metavar="N",
        type=_NON_NEGATIVE,
        help="keep cells with at least this many open peaks (default: that of "
        "scale_scvi.pp.filter_cells)",
        **_LIBRARY,
    )
    filters.add_argument(
        "--min-cells",
        metavar="N",
        type=_NON_NEGATIVE,
        help="keep peaks (and genes) open in at least this many cells (default: that of "
        "scale_scvi.pp.select_peaks)",
        **_LIBRARY,
    )
    filters.add_argument(
        "--n-top-peaks",
        metavar="N",
        type=_COUNT,
        help="then keep only the N peaks open in the most cells (default: all); fewer peaks "
        "train faster. The model then selects among these as SCALE.setup_anndata does by "
        "default (docs/quickstart.md), so an N above its selection does not shorten training",
        **_LIBRARY,
    )
    model = parser.add_argument_group("model and training (default: the library's)")
    model.add_argument(
        "-k",
        "--n-centroids",
        metavar="K",
        type=_INT,
        help="number of mixture components, i.e. at most this many clusters",
        **_LIBRARY,
    )
    model.add_argument(
        "--n-latent", metavar="N", type=_COUNT, help="latent dimensions", **_LIBRARY
    )
    model.add_argument(
        "--atac-link",
        choices=["logit", "cloglog"],
        help="link of the ATAC likelihood (the library's default: cloglog; logit is the "
        "original SCALE's)",
        **_LIBRARY,
    )
    model.add_argument(
        "--max-epochs",
        metavar="N",
        type=_COUNT,
        help="passes through the data (default: chosen by SCALE.train from the data size); "
        "fewer epochs train faster",
        **_LIBRARY,
    )
    model.add_argument("--batch-size", metavar="N", type=_COUNT, help="minibatch size", **_LIBRARY)
    model.add_argument("--lr", metavar="LR", type=_POSITIVE, help="learning rate", **_LIBRARY)
    model.add_argument(
        "--seed",
        metavar="N",
        type=_INT,
        default=0,
        help="random seed of training, UMAP and Leiden (default: 0, scanpy's; the same "
        "command on the same machine gives the same result, where scvi-tools alone would "
        "leave training unseeded)",
    )
    model.add_argument(
        "--accelerator",
        choices=["auto", "cpu", "gpu", "cuda", "mps"],
        help="Lightning accelerator",
        **_LIBRARY,
    )
    model.add_argument(
        "--devices", metavar="N", type=_DEVICES, help="number of devices, or 'auto'", **_LIBRARY
    )
    out = parser.add_argument_group("outputs")
    out.add_argument(
        "--color",
        metavar="KEY",
        action="append",
        default=[],
        help="also colour umap.png by this column of obs (repeatable)",
    )
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
        type=_PROBABILITY,
        help="probability threshold of --impute and --binary (default: 0.5)",
    )
    out.add_argument(
        "--resolution",
        metavar="R",
        type=_POSITIVE,
        help="Leiden resolution (default: scanpy's)",
        **_LIBRARY,
    )
    out.add_argument(
        "--n-top-specific",
        metavar="N",
        type=_COUNT,
        help="peaks per cluster in cluster_specific_peaks.csv (default: that of "
        "SCALE.get_cluster_specific_peaks)",
        **_LIBRARY,
    )
    parser.add_argument(
        "--no-progress-bar", action="store_true", help="do not show the training progress bar"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback when something fails, and every warning",
    )
    return parser


def given(args: argparse.Namespace, **names: str) -> dict:
    """``{keyword: value}`` of the options the user gave, for ``names = {keyword: dest}``."""
    return {key: getattr(args, dest) for key, dest in names.items() if hasattr(args, dest)}
