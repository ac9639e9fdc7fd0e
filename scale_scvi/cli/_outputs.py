"""The output folder: which names the CLI owns, refusing to clobber, atomic writes."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ._errors import CLIError

ADATA = "adata.h5ad"
MDATA = "mdata.h5mu"
MODEL = "model"
UMAP = "umap.png"
CURVES = "training_curves.png"
PEAKS = "cluster_specific_peaks.csv"
OUTPUTS = (ADATA, MDATA, MODEL, UMAP, CURVES, PEAKS)
_MODEL_FILE = "model.pt"  # what marks model/ as a saved model (scvi-tools' file name)


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_folder(outdir: Path, source: Path, overwrite: bool) -> None:
    """Refuse an output folder that would lose files: the input's, or results without
    ``overwrite``. A folder holding only other files is fine."""
    if outdir.exists() and not outdir.is_dir():
        raise CLIError(f"output {str(outdir)!r} exists and is not a folder")
    if source.exists() and _inside(source, outdir):
        raise CLIError(
            f"the input {str(source)!r} is inside the output folder {str(outdir)!r}; choose "
            "another -o so that the input can never be overwritten"
        )
    present = [name for name in OUTPUTS if (outdir / name).exists()]
    if present and not overwrite:
        raise CLIError(
            f"{str(outdir)!r} already holds {', '.join(present)}; pass --overwrite to replace "
            "them, or another -o"
        )
    model = outdir / MODEL
    if overwrite and model.exists() and not (model / _MODEL_FILE).is_file():
        raise CLIError(
            f"{str(model)!r} is not a saved model (no {_MODEL_FILE}); move it away, the CLI "
            "writes its model there"
        )


def clear_outputs(outdir: Path) -> list[str]:
    """Remove the CLI's own outputs from ``outdir`` (nothing else); return their names."""
    removed = []
    for name in OUTPUTS:
        path = outdir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(temporary)`` beside ``path``, then rename it to ``path`` in one step.

    An interrupted or failed write leaves no partial file under the final name (and removes
    the temporary one); ``write`` may create a file or a folder.
    """
    temporary = path.with_name(f".partial-{os.getpid()}.{path.name}")  # keeps the suffix
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        elif temporary.exists():
            temporary.unlink()
        raise
