"""One loader per tutorial dataset, as :mod:`scanpy.datasets` does: read a local copy, or
fetch the prepared file with :mod:`pooch` and check its SHA-256."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import anndata as ad

from scale_scvi.data._shared import CELL_LINES, DATA_ENV, FOREBRAIN, SCICAR_ATAC, SCICAR_RNA

#: Base URL where the prepared ``.h5ad`` files are published (``<url>/<file name>``).
URL_ENV = "SCALE_SCVI_DATA_URL"


class Dataset(NamedTuple):
    """A prepared file, its checksum and where its data come from."""

    file: str
    sha256: str
    source: str


DATASETS: dict[str, Dataset] = {
    "forebrain": Dataset(
        FOREBRAIN,
        "b8f57e534141704869f7762c7f7dc03ad4a35814eadbe903148b7df8580e6049",
        "adult mouse forebrain snATAC-seq, Preissl et al., Nat. Neurosci. 2018 (GEO GSE100033); "
        "1,043 cells of the cuhklinlab/RA3 repository's data/forebrain_sc_mat.rda",
    ),
    "cell_lines": Dataset(
        CELL_LINES,
        "2308f32dc211ef678984fc33b9ba2f116fcc21a834458986c03c0f6c7a8af390",
        "scATAC-seq of cell lines and sorted blood cells, Buenrostro et al. 2015 / Corces et "
        "al. 2016 (GEO GSE65360, GSE74310), as used by chromVAR (Schep et al. 2017); 600 cells "
        "of the FertigLab/ATACCoGAPS repository",
    ),
    "scicar_kidney_atac": Dataset(
        SCICAR_ATAC,
        "f28ce4bd5e88d360313710ed73465f79cafe2215dd0be7c6849e85ccf8862114",
        "sci-CAR mouse kidney, Cao et al., Science 2018 (GEO GSE117089), ATAC side; subset of "
        "the cuhklinlab/JSNMF repository",
    ),
    "scicar_kidney_rna": Dataset(
        SCICAR_RNA,
        "1d625926dec4febb31fd7675b69e03072b2c35a094c5844ac629c75e97166151",
        "sci-CAR mouse kidney, Cao et al., Science 2018 (GEO GSE117089), RNA side; subset of "
        "the cuhklinlab/JSNMF repository",
    ),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str, data_dir: str | Path | None = None, base_url: str | None = None) -> Path:
    """Path of a tutorial dataset's prepared file, checked against its SHA-256.

    Looks in ``data_dir`` (default ``$SCALE_SCVI_DATA``); a file found there must match the
    checksum. Otherwise the file is downloaded with :func:`pooch.retrieve` from
    ``base_url`` (default ``$SCALE_SCVI_DATA_URL``) into ``data_dir`` (default pooch's cache
    folder for ``scale_scvi``), and pooch checks the checksum.

    Parameters
    ----------
    name
        A key of :data:`DATASETS`.
    data_dir
        Folder holding (or to receive) the file.
    base_url
        URL of the folder where the prepared files are published.

    Returns
    -------
    The local path of the file.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; one of {sorted(DATASETS)}.")
    entry = DATASETS[name]
    folder = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if folder is not None and (Path(folder) / entry.file).exists():
        path = Path(folder) / entry.file
        found = _sha256(path)
        if found != entry.sha256:
            raise ValueError(
                f"{path} is not the expected file (SHA-256 {found}, expected {entry.sha256}); "
                "replace it with the published copy, or remove it to download that one."
            )
        return path
    base_url = base_url if base_url is not None else os.environ.get(URL_ENV)
    if base_url is None:
        raise FileNotFoundError(
            f"{entry.file} is not in {folder!r} and no download URL is set: set {DATA_ENV} to "
            f"a folder holding it, or {URL_ENV} (or base_url) to where the prepared files are "
            f"published. Its data: {entry.source}."
        )
    try:
        import pooch
    except ImportError as err:  # pragma: no cover - pooch is a dependency
        raise ImportError("Downloading the tutorial data needs pooch: pip install pooch") from err
    path = pooch.retrieve(
        url=f"{base_url.rstrip('/')}/{entry.file}",
        known_hash=f"sha256:{entry.sha256}",
        fname=entry.file,
        path=folder if folder is not None else pooch.os_cache("scale_scvi"),
    )
    return Path(path)


def forebrain(data_dir: str | Path | None = None, base_url: str | None = None) -> ad.AnnData:
    """Adult mouse forebrain snATAC-seq (Preissl et al. 2018, GEO GSE100033): 1,043 cells x
    140,102 binary peaks, 8 cell types in ``obs["cell_type"]`` (the forebrain tutorial).

    Parameters are those of :func:`fetch`.
    """
    return ad.read_h5ad(fetch("forebrain", data_dir, base_url))


def cell_lines(data_dir: str | Path | None = None, base_url: str | None = None) -> ad.AnnData:
    """scATAC-seq of cell lines and sorted blood cells (Buenrostro 2015 / Corces 2016, as in
    chromVAR): 600 cells x 5,036 peaks (counts), 12 types (the reference-mapping tutorial).

    Parameters are those of :func:`fetch`.
    """
    return ad.read_h5ad(fetch("cell_lines", data_dir, base_url))


def scicar_kidney(
    data_dir: str | Path | None = None, base_url: str | None = None
) -> tuple[ad.AnnData, ad.AnnData]:
    """sci-CAR mouse kidney (Cao et al. 2018, GEO GSE117089), the multiome tutorial's pair.

    Returns
    -------
    ``(atac, rna)``: 4,753 cells x 10,000 binary peaks and the same cells (same order) x
    5,000 genes (counts), 14 types in ``obs["cell_type"]`` of both.
    """
    return (
        ad.read_h5ad(fetch("scicar_kidney_atac", data_dir, base_url)),
        ad.read_h5ad(fetch("scicar_kidney_rna", data_dir, base_url)),
    )
