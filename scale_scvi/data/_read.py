"""Readers of 10x Genomics output: Market Matrix folders and ``.h5`` feature-barcode matrices."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp
from anndata import AnnData
from mudata import MuData

_MATRIX_NAMES = ("matrix.mtx.gz", "matrix.mtx")
_FEATURE_NAMES = (
    "peaks.bed.gz",
    "peaks.bed",
    "features.tsv.gz",
    "features.tsv",
    "genes.tsv.gz",
    "genes.tsv",
)
_BARCODE_NAMES = ("barcodes.tsv.gz", "barcodes.tsv")


def _find(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"{folder} has no {what} file (looked for {', '.join(names)}); a 10x-style folder "
        "needs matrix.mtx[.gz], peaks.bed[.gz] or features.tsv[.gz], and barcodes.tsv[.gz]."
    )


def _read_table(path: Path) -> pd.DataFrame:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        table = pd.read_csv(handle, sep="\t", header=None, dtype=str, comment="#")
    return table


def _features(path: Path) -> pd.DataFrame:
    table = _read_table(path)
    stem = path.name.removesuffix(".gz")
    if stem.endswith(".bed"):
        if table.shape[1] < 3:
            raise ValueError(
                f"{path} should have at least three tab-separated columns (chrom, start, end); "
                f"it has {table.shape[1]}."
            )
        var = pd.DataFrame(
            {
                "chrom": table[0].to_numpy(),
                "start": pd.to_numeric(table[1]).to_numpy(),
                "end": pd.to_numeric(table[2]).to_numpy(),
            }
        )
        var.index = table[0] + ":" + table[1] + "-" + table[2]
        return var
    # features.tsv: id, name[, feature type, chrom, start, end] as written by Cell Ranger.
    var = pd.DataFrame(index=pd.Index(table[0].to_numpy()))
    if table.shape[1] > 1:
        var["name"] = table[1].to_numpy()
    if table.shape[1] > 2:
        var["feature_types"] = table[2].to_numpy()
    if table.shape[1] > 5:
        var["chrom"] = table[3].to_numpy()
        var["start"] = pd.to_numeric(table[4], errors="coerce").to_numpy()
        var["end"] = pd.to_numeric(table[5], errors="coerce").to_numpy()
    return var


def read_10x_folder(path: str | Path, feature_type: str | None = None) -> AnnData:
    """Read a 10x-style folder of a peak (or feature) matrix into a cells x features AnnData.

    The folder holds ``matrix.mtx[.gz]`` (features x cells, Market Matrix format, as written by
    Cell Ranger ATAC / ARC), the features as ``peaks.bed[.gz]`` (chrom, start, end) or
    ``features.tsv[.gz]`` (id, name, type, ...), and ``barcodes.tsv[.gz]``.

    Parameters
    ----------
    path
        The folder.
    feature_type
        Keep only the features whose type (third column of ``features.tsv``) is this, e.g.
        ``"Peaks"`` for the ATAC part of a Cell Ranger ARC (multiome) folder. ``None`` keeps
        every feature.

    Returns
    -------
    AnnData with a float32 CSR ``X`` (cells x features), ``obs_names`` from the barcodes and
    ``var_names`` ``chrom:start-end`` (from ``peaks.bed``) or the feature ids; the peak
    coordinates, names and types are kept as columns of ``var``.

    Examples
    --------
    >>> adata = scale_scvi.data.read_10x_folder("filtered_peak_bc_matrix/")
    """
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist.")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; read_10x_folder takes a 10x-style folder.")
    matrix_path = _find(folder, _MATRIX_NAMES, "matrix")
    feature_path = _find(folder, _FEATURE_NAMES, "peaks/features")
    barcode_path = _find(folder, _BARCODE_NAMES, "barcodes")

    try:
        matrix = scipy.io.mmread(matrix_path)
    except (ValueError, OSError, IndexError, EOFError) as err:
        raise ValueError(
            f"{matrix_path} could not be read as a Market Matrix file ({err})."
        ) from err
    matrix = sp.csr_matrix(matrix.T, dtype=np.float32)
    var = _features(feature_path)
    barcodes = _read_table(barcode_path)[0].to_numpy()
    if matrix.shape != (len(barcodes), len(var)):
        raise ValueError(
            f"{matrix_path} is {matrix.shape[1]} features x {matrix.shape[0]} cells, but "
            f"{feature_path.name} lists {len(var)} features and {barcode_path.name} "
            f"{len(barcodes)} barcodes; the three files must come from the same matrix."
        )
    adata = AnnData(X=matrix, obs=pd.DataFrame(index=pd.Index(barcodes)), var=var)
    if feature_type is not None:
        if "feature_types" not in adata.var:
            raise ValueError(
                f"feature_type={feature_type!r} was given, but {feature_path.name} has no "
                "feature-type column; pass feature_type=None."
            )
        keep = (adata.var["feature_types"] == feature_type).to_numpy()
        if not keep.any():
            raise ValueError(
                f"No feature of type {feature_type!r} in {feature_path.name} (types: "
                f"{sorted(adata.var['feature_types'].unique())})."
            )
        adata = adata[:, keep].copy()
    adata.var_names_make_unique()
    return adata


# Cell Ranger's feature types and the modality names muon gives them.
_MODALITIES = {"Gene Expression": "rna", "Peaks": "atac", "Antibody Capture": "prot"}


def read_10x_h5(path: str | Path) -> AnnData | MuData:
    """Read a 10x Genomics ``.h5`` feature-barcode matrix: peaks only, or ARC multiome.

    The file is read with :func:`scanpy.read_10x_h5` (``gex_only=False``) and split on
    ``var["feature_types"]`` as muon does: a file of one feature type (e.g. Cell Ranger
    ATAC's ``filtered_peak_bc_matrix.h5``) gives an AnnData; a file of several (Cell Ranger
    ARC's ``filtered_feature_bc_matrix.h5``) gives a MuData with one modality per type,
    ``"rna"`` for Gene Expression and ``"atac"`` for Peaks, ready for
    :meth:`~scale_scvi.SCALE.setup_mudata`.

    Parameters
    ----------
    path
        The ``.h5`` file.

    Returns
    -------
    AnnData (cells x features, float32 CSR) or MuData; ``var_names`` are the feature ids
    (``chr1:100-600`` for peaks, Ensembl ids for genes, whose symbols are in
    ``var["gene_name"]``), and the file's feature metadata (``feature_types``, ``genome``,
    ``interval``, ...) are columns of ``var``.

    Examples
    --------
    >>> adata = scale_scvi.data.read_10x_h5("filtered_peak_bc_matrix.h5")
    >>> mdata = scale_scvi.data.read_10x_h5("filtered_feature_bc_matrix.h5")  # ARC multiome
    >>> SCALE.setup_mudata(mdata, modalities={"atac_layer": "atac", "rna_layer": "rna"})
    """
    import h5py
    import scanpy as sc

    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist or is not a file.")
    if not h5py.is_hdf5(source):
        raise ValueError(f"{source} is not an HDF5 file; a 10x Genomics .h5 matrix is expected.")
    with h5py.File(source, "r") as handle:
        if "matrix" not in handle:
            raise ValueError(
                f"{source} has no 'matrix' group: it is not a 10x Genomics feature-barcode "
                "matrix (Cell Ranger ATAC 2 / ARC, or Cell Ranger 3 and later)."
            )
    try:
        adata = sc.read_10x_h5(source, gex_only=False)
    except Exception as err:  # scanpy raises a bare Exception for a missing dataset
        raise ValueError(f"{source} could not be read as a 10x .h5 matrix ({err}).") from err
    adata.var["gene_name"] = adata.var_names.to_numpy()
    adata.var_names = adata.var.pop("gene_ids").to_numpy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    types = list(dict.fromkeys(adata.var["feature_types"]))
    if len(types) == 1:
        if types == ["Peaks"]:
            adata.var = adata.var.drop(columns="gene_name")
        adata.var_names_make_unique()
        return adata
    mods = {}
    for feature_type in types:
        name = _MODALITIES.get(feature_type, feature_type.lower().replace(" ", "_"))
        mod = adata[:, (adata.var["feature_types"] == feature_type).to_numpy()].copy()
        if feature_type == "Peaks":
            mod.var = mod.var.drop(columns="gene_name")
        mod.var_names_make_unique()
        mods[name] = mod
    return MuData(mods)
