"""Reading the input into memory, and the quality-control filters of scale_scvi.pp."""

from __future__ import annotations

from pathlib import Path

from anndata import AnnData
from mudata import MuData

from ._errors import CLIError, from_library, one_line

MULTIMODAL = ("atac", "rna")


def _from_mudata(mdata: MuData, path: str, modality: str | None) -> AnnData | MuData:
    if modality is None:
        if set(MULTIMODAL) <= set(mdata.mod):
            return mdata
        raise CLIError(
            f"{path!r} holds the modalities {list(mdata.mod)}, not both 'atac' and 'rna': pass "
            "--modality with the one holding the peaks"
        )
    if modality not in mdata.mod:
        raise CLIError(
            f"--modality {modality!r} is not in {path!r} (modalities: {list(mdata.mod)})"
        )
    return mdata.mod[modality].copy()


def _peaks_only(adata: AnnData, path: str) -> AnnData:
    """The peaks of a 10x matrix whose features are of several types."""
    if "feature_types" not in adata.var or adata.var["feature_types"].nunique() < 2:
        return adata
    types = sorted(adata.var["feature_types"].unique())
    if "Peaks" not in types:
        raise CLIError(f"{path!r} mixes feature types {types} and has no 'Peaks'")
    return adata[:, (adata.var["feature_types"] == "Peaks").to_numpy()].copy()


def read_input(path: str, modality: str | None) -> AnnData | MuData:
    """Read the input into memory: an AnnData, or a MuData (RNA + ATAC) for a joint run.

    An ``.h5mu`` file, or a 10x ``.h5`` of several feature types (Cell Ranger ARC), with
    ``atac`` and ``rna`` modalities and no ``modality`` gives the MuData; with ``modality``,
    that modality's AnnData.
    """
    import anndata as ad
    import mudata as md

    from scale_scvi.data import read_10x_folder, read_10x_h5

    source = Path(path)
    if not source.exists():
        raise CLIError(f"input {path!r} does not exist")
    suffix = source.suffix.lower()
    if modality is not None and (source.is_dir() or suffix == ".h5ad"):
        raise CLIError("--modality applies to .h5mu and 10x .h5 input only")
    if source.is_dir():
        try:
            return _peaks_only(read_10x_folder(source), path)
        except (FileNotFoundError, ValueError) as err:
            raise CLIError(one_line(err)) from err
    readers = {".h5ad": ad.read_h5ad, ".h5mu": md.read_h5mu, ".h5": read_10x_h5}
    if suffix not in readers:
        raise CLIError(
            f"input {path!r} is not an .h5ad, .h5mu or 10x .h5 file, or a 10x-style folder"
        )
    try:
        data = readers[suffix](source)
    except Exception as err:  # h5py / anndata raise several types for unreadable files
        raise CLIError(f"cannot read {path!r} as a {suffix} file ({one_line(err)})") from err
    if isinstance(data, MuData):
        return _from_mudata(data, path, modality)
    if modality is not None:
        raise CLIError(f"--modality {modality!r}: {path!r} holds one modality only")
    return data


def filter_data(
    data: AnnData | MuData, cell_kwargs: dict, peak_kwargs: dict, layer: str | None, log
) -> AnnData | MuData:
    """A filtered copy: cells by open peaks, then peaks (and genes) by the cells open in.

    ``cell_kwargs`` go to :func:`scale_scvi.pp.filter_cells` and ``peak_kwargs`` to
    :func:`scale_scvi.pp.select_peaks` (the options the user gave; the functions' defaults
    otherwise). For RNA + ATAC data, cells and peaks are filtered on ATAC and genes with the
    same ``min_cells``.
    """
    from scale_scvi import pp

    atac = data.mod["atac"] if isinstance(data, MuData) else data
    try:
        cells = pp.filter_cells(atac, layer=layer, **cell_kwargs)
        peaks = pp.select_peaks(atac, layer=layer, cells=cells, **peak_kwargs)
        if isinstance(data, MuData):
            rna = data.mod["rna"]
            if not atac.obs_names.equals(rna.obs_names):
                raise ValueError(
                    "the 'atac' and 'rna' modalities must hold the same cells in the same "
                    "order (all-zero rows for cells that lack one)"
                )
            gene_kwargs = {k: v for k, v in peak_kwargs.items() if k == "min_cells"}
            genes = pp.select_peaks(rna, cells=cells, **gene_kwargs)
    except (ValueError, TypeError) as err:
        raise from_library(err) from err
    kept = f"Kept {int(cells.sum())} of {data.n_obs} cells and {int(peaks.sum())} of " + (
        f"{atac.n_vars} peaks"
    )
    if not isinstance(data, MuData):
        log(f"{kept}.")
        return data[cells, peaks].copy()
    log(f"{kept} and {int(genes.sum())} of {rna.n_vars} genes.")
    out = MuData({"atac": atac[cells, peaks].copy(), "rna": rna[cells, genes].copy()})
    for column in shared_columns(data):
        out.obs[column] = data.obs[column].to_numpy()[cells]
    return out


def shared_columns(mdata: MuData) -> list[str]:
    """Columns of a MuData's ``obs`` that are not a modality's own (``"atac:..."``)."""
    return [c for c in mdata.obs.columns if ":" not in c]


def obs_columns(data: AnnData | MuData) -> list[str]:
    """The ``obs`` columns of the AnnData that the run writes (``adata.h5ad``)."""
    if isinstance(data, MuData):
        return [*data.mod["atac"].obs.columns, *shared_columns(data)]
    return list(data.obs.columns)
