"""The scale-scvi command-line tool and the 10x readers (folder and .h5)."""

from __future__ import annotations

import gzip
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
import scvi

from scale_scvi import SCALE
from scale_scvi.cli import main
from scale_scvi.cli._outputs import write_atomic
from scale_scvi.data import read_10x_folder, read_10x_h5, simulate_multiome, simulate_scatac

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


def _write_10x_h5(path: Path, matrix, ids, types, barcodes, names=None) -> Path:
    """A Cell Ranger (ATAC 2 / ARC / 3+) feature-barcode matrix: features x cells, CSC."""
    csr = sp.csr_matrix(matrix)  # cells x features CSR = features x cells CSC
    names = ids if names is None else names
    text = lambda values: np.array([str(v).encode() for v in values])  # noqa: E731
    with h5py.File(path, "w") as handle:
        group = handle.create_group("matrix")
        group["barcodes"] = text(barcodes)
        group["data"] = csr.data.astype(np.int32)
        group["indices"] = csr.indices.astype(np.int64)
        group["indptr"] = csr.indptr.astype(np.int64)
        group["shape"] = np.array([csr.shape[1], csr.shape[0]], dtype=np.int32)
        features = group.create_group("features")
        features["id"] = text(ids)
        features["name"] = text(names)
        features["feature_type"] = text(types)
        features["genome"] = text(["GRCh38"] * len(ids))
        features["interval"] = text([i if ":" in i else "chr1:1-2" for i in ids])
        features["_all_tag_keys"] = text(["genome", "interval"])
    return path


def _arc_h5(path: Path, mdata) -> Path:
    """An ARC multiome .h5 (genes then peaks) from a simulated MuData."""
    rna, atac = mdata.mod["rna"], mdata.mod["atac"]
    peaks = [f"chr2:{100 * i}-{100 * i + 50}" for i in range(atac.n_vars)]
    genes = [f"ENSG{i:05d}" for i in range(rna.n_vars)]
    return _write_10x_h5(
        path,
        sp.hstack([sp.csr_matrix(rna.X), sp.csr_matrix(atac.X)]),
        genes + peaks,
        ["Gene Expression"] * len(genes) + ["Peaks"] * len(peaks),
        [f"BC{i}-1" for i in range(mdata.n_obs)],
        names=[f"GENE{i % 7}" for i in range(len(genes))] + peaks,
    )


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


def test_read_10x_h5_peaks_only(sim, tmp_path):
    peaks = [f"chr1:{1000 * i}-{1000 * i + 500}" for i in range(sim.n_vars)]
    counts = sim.X.copy()
    counts.data = np.ceil(counts.data * 3)
    path = _write_10x_h5(
        tmp_path / "filtered_peak_bc_matrix.h5",
        counts,
        peaks,
        ["Peaks"] * sim.n_vars,
        [f"AAAC-{i}" for i in range(sim.n_obs)],
    )
    adata = read_10x_h5(path)
    assert isinstance(adata, ad.AnnData)
    assert adata.shape == sim.shape and sp.issparse(adata.X) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), counts.toarray())
    assert list(adata.var_names[:2]) == peaks[:2] and adata.obs_names[0] == "AAAC-0"
    assert set(adata.var["feature_types"]) == {"Peaks"} and "interval" in adata.var


def test_read_10x_h5_arc_multiome_gives_mudata(tmp_path):
    mdata = simulate_multiome(n_cells=40, n_peaks=30, n_genes=20, n_types=2, seed=0)
    result = read_10x_h5(_arc_h5(tmp_path / "arc.h5", mdata))
    assert isinstance(result, md.MuData) and set(result.mod) == {"rna", "atac"}
    rna, atac = result.mod["rna"], result.mod["atac"]
    np.testing.assert_array_equal(atac.X.toarray(), sp.csr_matrix(mdata.mod["atac"].X).toarray())
    np.testing.assert_array_equal(rna.X.toarray(), sp.csr_matrix(mdata.mod["rna"].X).toarray())
    assert rna.var_names[0] == "ENSG00000" and rna.var["gene_name"].iloc[0] == "GENE0"
    assert atac.var_names[0] == "chr2:0-50" and "gene_name" not in atac.var


def test_read_10x_h5_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_10x_h5(tmp_path / "none.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        read_10x_h5(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="no 'matrix' group"):
        read_10x_h5(tmp_path / "other.h5")


# ------------------------------------------------------------------ end to end
def test_cli_h5ad_end_to_end(h5ad_file, sim, tmp_path, capsys, monkeypatch):
    # This set has fewer peaks than setup_anndata's floor of the most open ones
    # (n_min_peaks), which would read them all: without the floor the model reads the peaks
    # open in 1 % of the cells, so that the output's unread columns are checked below.
    setup = SCALE.setup_anndata.__func__

    def setup_anndata(cls, adata, **kwargs):
        kwargs.setdefault("n_min_peaks", None)
        return setup(cls, adata, **kwargs)

    monkeypatch.setattr(SCALE, "setup_anndata", classmethod(setup_anndata))
    before = _md5(h5ad_file)
    out = tmp_path / "out"
    args = [h5ad_file, "-o", out, "-k", "3", "--n-latent", "4", "--impute", "--binary"]
    fast = ["--max-epochs", "2", "--min-peaks", "1", "--min-cells", "1"]
    code = main([str(a) for a in [*args, *fast, "--threshold", "0.2", "--color", "cell_type"]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == ""  # progress bar and messages go to stderr
    assert "Epoch 2/2" in captured.err and "Saved the model" in captured.err
    n_found = len(set(ad.read_h5ad(out / "adata.h5ad").obs["scale_cluster"]))
    noun = "SCALE cluster" if n_found == 1 else "SCALE clusters"
    assert f": {n_found} {noun}, " in captured.err
    assert _md5(h5ad_file) == before  # the input is never modified
    for name in ("adata.h5ad", "umap.png", "training_curves.png", "model/model.pt"):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".partial")]
    result = ad.read_h5ad(out / "adata.h5ad")
    n_cells = int((np.asarray((sim.X > 0).sum(1)).ravel() >= 1).sum())  # --min-peaks 1
    assert 0 < n_cells < sim.n_obs
    assert result.n_obs == n_cells
    assert result.obsm["X_scale"].shape == (n_cells, 4)
    assert result.obsm["X_umap"].shape == (n_cells, 2)
    assert result.obsp["connectivities"].shape == (n_cells, n_cells)
    np.testing.assert_allclose(result.obsm["scale_probabilities"].sum(1), 1.0, atol=1e-5)
    assert set(result.obs["scale_cluster"]) <= {"0", "1", "2"}
    assert result.obs["leiden"].nunique() >= 1
    imputed, binary = result.layers["scale_imputed"], result.layers["scale_binary"]
    assert sp.issparse(imputed) and sp.issparse(binary)
    assert imputed.nnz > 0 and imputed.data.min() >= 0.2
    np.testing.assert_array_equal(binary.indices, imputed.indices)
    np.testing.assert_array_equal(binary.data, 1.0)
    # The imputation covers the peaks the model reads; the others' columns stay empty.
    read = result.var["scale_selected"].to_numpy()
    assert 0 < read.sum() < result.n_vars
    assert f"{read.sum():,} features read of {result.n_vars:,}" in captured.err
    assert "the encoder reads 30 LSI coordinates of them" in captured.err  # < 800 cells
    assert imputed.shape == (n_cells, result.n_vars) and imputed[:, ~read].nnz == 0
    has_peaks = (out / "cluster_specific_peaks.csv").is_file()
    assert has_peaks == (result.obs["scale_cluster"].nunique() > 1)
    model = SCALE.load(out / "model", adata=result)
    np.testing.assert_allclose(
        model.get_latent_representation(), result.obsm["X_scale"], rtol=1e-4, atol=1e-5
    )
    # A second run into the same folder needs --overwrite.
    code, err = _run([*args, *FAST], capsys)
    assert code == 1 and "--overwrite" in err


def test_cli_passes_only_the_options_given(h5ad_file, tmp_path, capsys, monkeypatch):
    """The library's signature defaults are the only defaults."""
    seen = {}
    init = SCALE.__init__

    def record_init(self, adata, **kwargs):
        seen["init"] = kwargs
        init(self, adata, **kwargs)

    def record_train(self, **kwargs):
        seen.setdefault("train", []).append(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(SCALE, "__init__", record_init)
    monkeypatch.setattr(SCALE, "train", record_train)
    code, err = _run([h5ad_file, "-o", tmp_path / "a", "--min-peaks", "1"], capsys)
    assert code == 1 and "stop here" in err
    assert seen["init"] == {}
    assert set(seen["train"][0]) == {"callbacks"}
    options = ["-k", "3", "--max-epochs", "7", "--lr", "0.01", "--batch-size", "16", "-q"]
    options += ["--min-peaks", "1", "--atac-link", "cloglog"]
    code, err = _run([h5ad_file, "-o", tmp_path / "b", *options], capsys)
    assert seen["init"] == {"n_centroids": 3, "atac_link": "cloglog"}
    kwargs = seen["train"][1]
    kwargs.pop("callbacks")
    assert kwargs == {"max_epochs": 7, "lr": 0.01, "batch_size": 16, "enable_progress_bar": False}
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_cli_runs_are_repeatable(h5ad_file, tmp_path, capsys):
    """Without --seed the command seeds training with 0 (scvi-tools alone would not): the
    same command gives the same latent space and clusters; --seed gives another run."""
    runs = {}
    for name, extra in [("a", []), ("b", []), ("c", ["--seed", "1"])]:
        scvi.settings.seed = None  # whatever the caller's process had set
        code, err = _run([h5ad_file, "-o", tmp_path / name, *FAST, *extra], capsys)
        assert code == 0, err
        runs[name] = ad.read_h5ad(tmp_path / name / "adata.h5ad")
    np.testing.assert_array_equal(runs["a"].obsm["X_scale"], runs["b"].obsm["X_scale"])
    np.testing.assert_array_equal(runs["a"].obsm["X_umap"], runs["b"].obsm["X_umap"])
    assert (runs["a"].obs["leiden"] == runs["b"].obs["leiden"]).all()
    assert np.abs(runs["a"].obsm["X_scale"] - runs["c"].obsm["X_scale"]).max() > 1e-3


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


def test_cli_h5mu_modality_and_arc_h5_joint(tmp_path, capsys):
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
    assert _md5(path) == before
    arc = _arc_h5(tmp_path / "filtered_feature_bc_matrix.h5", mdata)
    code, err = _run([arc, "-o", tmp_path / "joint", "-k", "3", *FAST[:-1]], capsys)  # not -q
    assert code == 0, err
    joint = md.read_h5mu(tmp_path / "joint" / "mdata.h5mu")
    assert set(joint.mod) == {"atac", "rna"}
    # every gene and every peak the model reads
    assert f"{joint.n_vars:,} features read of {joint.n_vars:,}" in err
    assert joint.obsm["X_scale"].shape == (joint.n_obs, 10)
    assert "scale_cluster" in joint.obs
    assert joint.mod["atac"].var["scale_selected"].all()  # every peak, below the cap
    assert atac.var["scale_selected"].any()
    assert joint.mod["atac"].var_names[0].startswith("chr2:")
    assert (tmp_path / "joint" / "adata.h5ad").is_file()


def test_cli_large_data_neighbour_graph(tmp_path, capsys):
    """12,000 cells: scanpy's approximate-neighbour path (>= 8,192 cells) is reached."""
    adata = simulate_scatac(n_cells=12_000, n_peaks=150, n_types=3, seed=0)
    path = tmp_path / "large.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "out"
    # One component: no k-means of the prior and no cluster-specific peaks, to keep it short.
    args = [path, "-o", out, "-k", "1", "--n-latent", "4", "--batch-size", "1024"]
    options = ["--max-epochs", "1", "--min-peaks", "1", "--min-cells", "1", "-q"]
    code, err = _run([*args, *options], capsys)
    assert code == 0, err
    result = ad.read_h5ad(out / "adata.h5ad")
    assert result.n_obs >= 8_192
    assert result.obsp["connectivities"].shape == (result.n_obs, result.n_obs)
    assert result.obsm["X_umap"].shape == (result.n_obs, 2)
    assert result.obs["leiden"].nunique() >= 1


# ------------------------------------------------------------------ the output folder
def _outputs(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_cli_leaves_a_users_files_alone(h5ad_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    # A folder with only the user's own files is fine without --overwrite.
    code, err = _run([h5ad_file, "-o", out, "-k", "2", *FAST], capsys)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"
    # Stale outputs of an earlier run: --overwrite removes them, one cluster writes no peaks.
    (out / "cluster_specific_peaks.csv").write_text("stale")
    code, err = _run([h5ad_file, "-o", out, "-k", "1", "--overwrite", *FAST], capsys)
    assert code == 0, err
    assert not (out / "cluster_specific_peaks.csv").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert _outputs(out) == {"notes.txt", "adata.h5ad", "model", "umap.png", "training_curves.png"}
    assert ad.read_h5ad(out / "adata.h5ad").obs["scale_cluster"].nunique() == 1


def test_cli_refuses_a_folder_with_any_of_its_outputs(h5ad_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "umap.png").write_text("the user's picture")
    code, err = _run([h5ad_file, "-o", out, *FAST], capsys)
    assert code == 1 and "umap.png" in err and "--overwrite" in err
    assert (out / "umap.png").read_text() == "the user's picture"
    (out / "umap.png").unlink()
    (out / "model").mkdir()
    (out / "model" / "draft.txt").write_text("not a model")
    code, err = _run([h5ad_file, "-o", out, "--overwrite", *FAST], capsys)
    assert code == 1 and "is not a saved model" in err
    assert (out / "model" / "draft.txt").is_file()


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_cli_refuses_an_output_folder_holding_the_input(sim, tmp_path, capsys, overwrite):
    inside = tmp_path / "adata.h5ad"
    sim.write_h5ad(inside)
    before = _md5(inside)
    code, err = _run([inside, "-o", tmp_path, *overwrite, *FAST], capsys)
    assert code == 1 and "inside the output folder" in err
    assert _md5(inside) == before


def test_cli_saves_the_model_before_a_downstream_failure(h5ad_file, tmp_path, capsys, monkeypatch):
    import scanpy as sc

    def broken(*args, **kwargs):
        raise RuntimeError("layout failed")

    monkeypatch.setattr(sc.tl, "umap", broken)
    out = tmp_path / "out"
    code, err = _run([h5ad_file, "-o", out, "-k", "2", *FAST], capsys)
    assert code == 1
    assert len(err.strip().splitlines()) == 1, err
    assert "layout failed" in err and f"the trained model is saved in {out / 'model'}" in err
    assert (out / "model" / "model.pt").is_file() and not (out / "adata.h5ad").exists()


def test_write_atomic_keeps_the_previous_file_on_failure(tmp_path):
    target = tmp_path / "adata.h5ad"
    target.write_text("previous")

    def half_then_fail(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half_then_fail)
    assert target.read_text() == "previous"
    assert _outputs(tmp_path) == {"adata.h5ad"}
    write_atomic(target, lambda path: path.write_text("new"))
    assert target.read_text() == "new" and _outputs(tmp_path) == {"adata.h5ad"}


# ------------------------------------------------------------------ messages and signals
def test_cli_shows_the_package_warnings_only(h5ad_file, tmp_path, capsys):
    # No filter: cells and peaks without any open entry are kept, and the model warns.
    args = [h5ad_file, "-o", tmp_path / "out", "-k", "2", "--max-epochs", "1"]
    code, err = _run([*args, "--min-peaks", "0", "--min-cells", "0", "--no-progress-bar"], capsys)
    assert code == 0, err
    lines = err.strip().splitlines()
    warned = [line for line in lines if line.startswith("scale-scvi: warning: ")]
    assert any("have no accessible peak" in line for line in warned), err
    ours = ("Read ", "Kept", "Training", "Saved", "Computing", "All cells", "Done", "scale-scvi: ")
    assert all(line.startswith(ours) for line in lines), err  # no third-party noise


@pytest.mark.parametrize(
    ("signum", "code", "message"),
    [(signal.SIGTERM, 143, "stopped by SIGTERM"), (signal.SIGINT, 130, "interrupted (Ctrl-C)")],
)
def test_cli_signal_exit_codes(h5ad_file, tmp_path, signum, code, message):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "scale_scvi.cli", str(h5ad_file), "-o", str(out)]
    command += ["--max-epochs", "100000", "--min-peaks", "1", "--no-progress-bar"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    lines = []
    for line in process.stderr:  # wait until training has started
        lines.append(line)
        if line.startswith("Training"):
            break
    time.sleep(2.0)
    process.send_signal(signum)
    stdout, rest = process.communicate(timeout=120)
    lines += rest.splitlines(keepends=True)
    assert process.returncode == code, "".join(lines)
    assert stdout == ""
    assert lines[-1].strip() == f"scale-scvi: {message}; no results were written"
    assert "Traceback" not in "".join(lines) and "Exception raised" not in "".join(lines)
    assert not out.exists() or not any(out.iterdir())


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
    (root / "garbage.h5").write_bytes(b"not a 10x file")
    return root


ERRORS = [
    (["{bad}/missing.h5ad"], "does not exist"),
    (["{bad}/garbage.h5ad"], "cannot read"),
    (["{bad}/garbage.h5"], "not an HDF5 file"),
    (["{bad}/table.csv"], "not an .h5ad, .h5mu or 10x .h5 file"),
    (["{bad}/one.h5mu"], "pass --modality"),
    (["{bad}/one.h5mu", "--modality", "atac"], "not in"),
    (["{bad}/negative.h5ad"], "negative values"),
    (["{bad}/empty_folder"], "no matrix file"),
    (["{h5ad}", "--min-peaks", "100000"], "loosen --min-peaks"),
    (["{h5ad}", "--min-peaks", "1", "--min-cells", "100000"], "lower --min-cells"),
    (["{h5ad}", "--min-peaks", "1", "-k", "100000"], "--n-centroids=100000 is out of range"),
    (["{h5ad}", "--min-peaks", "1", "-k", "0"], "--n-centroids=0 is out of range"),
    (["{h5ad}", "--min-peaks", "1", "--batch-key", "donor"], "--batch-key='donor'"),
    (["{h5ad}", "--layer", "counts"], "Layer 'counts'"),
    (["{h5ad}", "--modality", "atac"], "--modality applies"),
    (["{h5ad}", "--threshold", "0.3"], "--threshold applies"),
    (["{h5ad}", "--color", "donor"], "--color 'donor' is not a column of obs"),
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
    (["-k", "two"], "not an integer"),
    (["--n-latent", "two"], "not an integer"),
    (["--n-latent", "0"], "positive integer"),
    (["--lr", "-1"], "positive number"),
    (["--lr", "nan"], "positive number"),
    (["--threshold", "1.5"], "between 0 and 1"),
    (["--min-peaks", "-1"], "an integer >= 0"),
    (["--devices", "x"], "not an integer"),
    (["--devices", "0"], "a positive integer or 'auto'"),
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
    for text in ("--n-centroids", "--impute", "--color", ".h5", "adata.h5ad", "examples:"):
        assert text in out
    assert "60,000" not in out and "(default: 30)" not in out  # no copy of library defaults


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


def test_cli_imports_torch_only_after_setting_huge_pages():
    """torch reads THP_MEM_ALLOC_ENABLE once: the entry point sets it before importing torch."""
    code = "import sys, scale_scvi.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_long_run_is_announced_before_training_and_after_one_epoch(monkeypatch):
    """The command says up front when training will be long, and how to shorten it."""
    import itertools
    from types import SimpleNamespace

    from scale_scvi.cli import _progress

    said: list[str] = []
    cpu = SimpleNamespace(device=SimpleNamespace(type="cpu"))
    # 4,000 steps, estimated at ten times the threshold
    n_features = round(10 * _progress.LONG_RUN_S / (4_000 * _progress.SECONDS_PER_FEATURE_STEP))
    notice = _progress.RunTimeNotice(n_features, said.append)
    trainer = SimpleNamespace(num_training_batches=40, max_epochs=100, current_epoch=0)
    clock = itertools.chain([0.0], itertools.repeat(30.0))
    monkeypatch.setattr(_progress, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    notice.on_train_start(trainer, cpu)
    assert len(said) == 1
    assert f"long run: 100 epochs of 40 steps on {n_features:,} features" in said[0]
    assert "about 50 min on an idle 2-core CPU" in said[0]
    assert "--max-epochs" in said[0] and "--n-top-peaks" in said[0]
    notice.on_train_epoch_end(trainer, cpu)  # 30 s for the first epoch, 99 to go
    assert len(said) == 2 and "first epoch took 30 s: about 50 min to go" in said[1]

    # a short run says nothing, and neither does a run on a GPU
    said.clear()
    short = _progress.RunTimeNotice(2_000, said.append)
    short.on_train_start(SimpleNamespace(num_training_batches=10, max_epochs=20), cpu)
    gpu = SimpleNamespace(device=SimpleNamespace(type="cuda"))
    notice.on_train_start(trainer, gpu)
    assert said == []


def test_counts_in_messages_agree_in_number():
    from scale_scvi.cli._run import _count

    assert _count(1, "SCALE cluster") == "1 SCALE cluster"
    assert _count(8, "Leiden cluster") == "8 Leiden clusters"
