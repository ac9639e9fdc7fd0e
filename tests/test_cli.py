"""The scale-scvi command-line tool and the 10x-folder reader."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
from pathlib import Path

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from scale_scvi import SCALE
from scale_scvi.cli import main
from scale_scvi.data import read_10x_folder, simulate_multiome, simulate_scatac

FAST = ["--max-epochs", "2", "--min-peaks", "1", "--min-cells", "1", "--no-progress-bar", "-q"]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sim():
    return simulate_scatac(n_cells=150, n_peaks=200, n_types=3, seed=4)


@pytest.fixture(scope="module")
def h5ad_file(sim, tmp_path_factory):
    path = tmp_path_factory.mktemp("input") / "peaks.h5ad"
    sim.write_h5ad(path)
    return path


def _write_10x(folder: Path, matrix: sp.spmatrix, features: list[str], barcodes, bed: bool):
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "matrix.mtx.gz", "wb") as handle:
        scipy.io.mmwrite(handle, sp.coo_matrix(matrix.T))
    name = "peaks.bed.gz" if bed else "features.tsv.gz"
    with gzip.open(folder / name, "wt") as handle:
        handle.write("\n".join(features) + "\n")
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as handle:
        handle.write("\n".join(barcodes) + "\n")
    return folder


@pytest.fixture(scope="module")
def tenx_folder(sim, tmp_path_factory):
    peaks = [f"chr1\t{1000 * i}\t{1000 * i + 500}" for i in range(sim.n_vars)]
    barcodes = [f"AAAC-{i}" for i in range(sim.n_obs)]
    return _write_10x(tmp_path_factory.mktemp("tenx") / "peaks", sim.X, peaks, barcodes, bed=True)


def _run(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


# ------------------------------------------------------------------ reader
def test_read_10x_folder_with_peaks_bed(sim, tenx_folder):
    adata = read_10x_folder(tenx_folder)
    assert adata.shape == sim.shape
    assert sp.issparse(adata.X) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), sim.X.toarray())
    assert adata.var_names[1] == "chr1:1000-1500"
    assert adata.var["start"].iloc[1] == 1000 and adata.var["chrom"].iloc[0] == "chr1"
    assert adata.obs_names[0] == "AAAC-0"


def test_read_10x_folder_multiome_features(tmp_path):
    matrix = sp.random(6, 5, density=0.5, format="csr", random_state=0)
    features = [f"g{i}\tgene{i}\tGene Expression\tchr1\t{i}\t{i + 1}" for i in range(2)]
    features += [
        f"chr2:{i}-{i + 9}\tchr2:{i}-{i + 9}\tPeaks\tchr2\t{i}\t{i + 9}" for i in range(3)
    ]
    barcodes = [f"c{i}" for i in range(6)]
    folder = _write_10x(tmp_path / "arc", matrix, features, barcodes, bed=False)
    both = read_10x_folder(folder)
    assert list(both.var["feature_types"].unique()) == ["Gene Expression", "Peaks"]
    peaks = read_10x_folder(folder, feature_type="Peaks")
    assert list(peaks.var_names) == ["chr2:0-9", "chr2:1-10", "chr2:2-11"]
    np.testing.assert_allclose(peaks.X.toarray(), matrix[:, 2:].toarray())
    with pytest.raises(ValueError, match="No feature of type"):
        read_10x_folder(folder, feature_type="Protein")


def test_read_10x_folder_errors(tmp_path, sim):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_10x_folder(tmp_path / "nowhere")
    folder = _write_10x(tmp_path / "short", sim.X, ["chr1\t1\t2"] * 3, ["a"] * sim.n_obs, True)
    with pytest.raises(ValueError, match="same matrix"):
        read_10x_folder(folder)
    (folder / "barcodes.tsv.gz").unlink()
    with pytest.raises(FileNotFoundError, match="barcodes"):
        read_10x_folder(folder)


# ------------------------------------------------------------------ end to end
def test_cli_h5ad_end_to_end(h5ad_file, sim, tmp_path, capsys):
    before = _md5(h5ad_file)
    out = tmp_path / "out"
    args = [h5ad_file, "-o", out, "-k", "3", "--n-latent", "4", "--impute", "--binary"]
    code, err = _run([*args, *FAST, "--threshold", "0.2"], capsys)
    assert code == 0, err
    assert _md5(h5ad_file) == before  # the input is never modified
    for name in ("adata.h5ad", "umap.png", "training_curves.png", "model/model.pt"):
        assert (out / name).is_file(), name
    result = ad.read_h5ad(out / "adata.h5ad")
    n_cells = int((np.asarray((sim.X > 0).sum(1)).ravel() >= 1).sum())  # --min-peaks 1
    assert 0 < n_cells < sim.n_obs
    assert result.n_obs == n_cells
    assert result.obsm["X_scale"].shape == (n_cells, 4)
    assert result.obsm["X_umap"].shape == (n_cells, 2)
    np.testing.assert_allclose(result.obsm["scale_probabilities"].sum(1), 1.0, atol=1e-5)
    assert set(result.obs["scale_cluster"]) <= {"0", "1", "2"}
    assert result.obs["leiden"].nunique() >= 1
    imputed, binary = result.layers["scale_imputed"], result.layers["scale_binary"]
    assert sp.issparse(imputed) and sp.issparse(binary)
    assert imputed.nnz > 0 and imputed.data.min() >= 0.2
    np.testing.assert_array_equal(binary.indices, imputed.indices)
    np.testing.assert_array_equal(binary.data, 1.0)
    has_peaks = (out / "cluster_specific_peaks.csv").is_file()
    assert has_peaks == (result.obs["scale_cluster"].nunique() > 1)
    model = SCALE.load(out / "model", adata=result)
    np.testing.assert_allclose(
        model.get_latent_representation(), result.obsm["X_scale"], rtol=1e-4, atol=1e-5
    )
    # A second run into the same folder needs --overwrite.
    code, err = _run([*args, *FAST], capsys)
    assert code == 1 and "--overwrite" in err


def test_cli_10x_folder_with_filters(tenx_folder, sim, tmp_path, capsys):
    out = tmp_path / "out"
    min_peaks = 10
    args = [tenx_folder, "-o", out, "-k", "2", "--n-top-peaks", "50", *FAST]
    code, err = _run([*args, "--min-peaks", min_peaks], capsys)
    assert code == 0, err
    result = ad.read_h5ad(out / "adata.h5ad")
    open_per_cell = np.asarray((sim.X > 0).sum(1)).ravel()
    assert result.n_obs == int((open_per_cell >= min_peaks).sum())
    assert result.n_vars == 50
    assert result.obs_names[0].startswith("AAAC-")
    assert result.var_names[0].startswith("chr1:")
    # The 50 kept peaks are the most often open ones among the kept cells.
    counts = pd.Series(
        np.asarray((sim.X[open_per_cell >= min_peaks] > 0).sum(0)).ravel(),
        index=[f"chr1:{1000 * i}-{1000 * i + 500}" for i in range(sim.n_vars)],
    )
    assert counts[result.var_names].min() >= counts.sort_values().iloc[-50]


def test_cli_h5mu_one_modality_and_joint(tmp_path, capsys):
    mdata = simulate_multiome(n_cells=120, n_peaks=150, n_genes=80, n_types=3, seed=0)
    path = tmp_path / "multiome.h5mu"
    mdata.write_h5mu(path)
    before = _md5(path)
    code, err = _run(
        [path, "-o", tmp_path / "atac", "--modality", "atac", "-k", "3", *FAST], capsys
    )
    assert code == 0, err
    atac = ad.read_h5ad(tmp_path / "atac" / "adata.h5ad")
    assert atac.n_vars <= 150 and "X_scale" in atac.obsm
    code, err = _run([path, "-o", tmp_path / "joint", "-k", "3", *FAST], capsys)
    assert code == 0, err
    joint = md.read_h5mu(tmp_path / "joint" / "mdata.h5mu")
    assert set(joint.mod) == {"atac", "rna"}
    assert joint.obsm["X_scale"].shape == (joint.n_obs, 10)
    assert "scale_cluster" in joint.obs
    assert (tmp_path / "joint" / "adata.h5ad").is_file()
    assert _md5(path) == before


# ------------------------------------------------------------------ errors
@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, sim):
    root = tmp_path_factory.mktemp("bad")
    (root / "garbage.h5ad").write_bytes(b"this is not an HDF5 file")
    (root / "table.csv").write_text("a,b\n1,2\n")
    only = md.MuData({"peaks": sim.copy()})
    only.write_h5mu(root / "one.h5mu")
    negative = sim.copy()
    negative.X = negative.X.toarray()
    negative.X[0, 0] = -1.0
    negative.write_h5ad(root / "negative.h5ad")
    (root / "empty_folder").mkdir()
    return root


ERRORS = [
    (["{bad}/missing.h5ad"], "does not exist"),
    (["{bad}/garbage.h5ad"], "cannot read"),
    (["{bad}/table.csv"], "not an .h5ad file"),
    (["{bad}/one.h5mu"], "pass --modality"),
    (["{bad}/one.h5mu", "--modality", "atac"], "not in"),
    (["{bad}/negative.h5ad"], "negative values"),
    (["{bad}/empty_folder"], "no matrix file"),
    (["{h5ad}", "--min-peaks", "100000"], "lower --min-peaks"),
    (["{h5ad}", "--min-peaks", "1", "--min-cells", "100000"], "--min-cells"),
    (["{h5ad}", "--min-peaks", "1", "-k", "100000"], "larger than the number of cells"),
    (["{h5ad}", "--batch-key", "donor"], "--batch-key 'donor'"),
    (["{h5ad}", "--layer", "counts"], "Layer 'counts'"),
    (["{h5ad}", "--modality", "atac"], "--modality applies"),
    (["{h5ad}", "--threshold", "0.3"], "--threshold applies"),
]


@pytest.mark.parametrize(("argv", "message"), ERRORS)
def test_cli_errors_are_one_line(argv, message, bad_inputs, h5ad_file, tmp_path, capsys):
    argv = [a.format(bad=bad_inputs, h5ad=h5ad_file) for a in argv]
    code, err = _run([*argv, "-o", tmp_path / "out", "-q"], capsys)
    assert code == 1
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("scale-scvi: error: ")
    assert message in err
    assert not (tmp_path / "out" / "adata.h5ad").exists()


BAD_OPTIONS = [
    (["-k", "0"], "positive integer"),
    (["--n-latent", "two"], "not an integer"),
    (["--lr", "-1"], "positive number"),
    (["--lr", "nan"], "positive number"),
    (["--threshold", "1.5"], "between 0 and 1"),
    (["--devices", "x"], "not an integer"),
    (["--accelerator", "tpu9"], "invalid choice"),
    (["--epochs", "3"], "unrecognized arguments"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS)
def test_cli_bad_options_exit_2_with_one_line(options, message, h5ad_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(h5ad_file), "-o", str(tmp_path / "out"), *options])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err and "--help" in err


def test_cli_missing_output_option(h5ad_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(h5ad_file)])
    assert exit_info.value.code == 2
    assert "-o/--outdir" in capsys.readouterr().err


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for text in ("--n-centroids", "--impute", "adata.h5ad", "umap.png", "examples:"):
        assert text in out


def test_console_entry_point_error_has_no_traceback(tmp_path):
    failed = subprocess.run(
        [sys.executable, "-m", "scale_scvi.cli", str(tmp_path / "no.h5ad"), "-o", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines() == [
        f"scale-scvi: error: input '{tmp_path / 'no.h5ad'}' does not exist"
    ]
