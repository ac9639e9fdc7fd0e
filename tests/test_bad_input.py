"""Bad and unusual input: a clear error naming the problem, or documented correct handling.

Every case is a row of a table. Rows that must fail state the exception and the words its
message must contain; rows that must work train a small model and compare it with the same
model trained on the reference input (a binary float32 CSR matrix), since SCALE reads any
value > 0 as accessible. In every row the user's AnnData must be left as it was, apart
from what ``setup_anndata`` registers (``obs["_scvi_*"]`` columns and ``uns["_scvi_*"]``).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
from mudata import MuData

from scale_scvi import SCALE
from scale_scvi.data import simulate_scatac

from .conftest import not_canonical

N_CELLS, N_PEAKS = 120, 150
MODEL_KWARGS = {"n_centroids": 4, "n_hidden": (16,), "n_latent": 5}
TRAIN_KWARGS = {"max_epochs": 2, "batch_size": 40, "enable_progress_bar": False}


def reference() -> ad.AnnData:
    """Binary float32 CSR data with a little structure; every cell and peak non-empty."""
    adata = simulate_scatac(
        n_cells=N_CELLS, n_peaks=N_PEAKS, n_types=3, density=(0.1, 0.2), seed=3
    )
    X = adata.X.tolil()
    X[np.arange(N_CELLS), np.arange(N_CELLS) % N_PEAKS] = 1.0  # no empty cell
    X[np.arange(N_PEAKS) % N_CELLS, np.arange(N_PEAKS)] = 1.0  # no empty peak
    adata.X = X.tocsr().astype(np.float32)
    adata.obs["batch"] = pd.Categorical(np.where(np.arange(N_CELLS) % 2, "a", "b"))
    return adata


def with_x(X) -> Callable[[Path], ad.AnnData]:
    def make(tmp_path: Path) -> ad.AnnData:
        adata = reference()
        adata.X = X(adata.X) if callable(X) else X
        return adata

    return make


def edited(edit: Callable[[ad.AnnData], None]) -> Callable[[Path], ad.AnnData]:
    def make(tmp_path: Path) -> ad.AnnData:
        adata = reference()
        edit(adata)
        return adata

    return make


def backed(X) -> Callable[[Path], ad.AnnData]:
    def make(tmp_path: Path) -> ad.AnnData:
        adata = with_x(X)(tmp_path)
        path = tmp_path / "backed.h5ad"
        adata.write_h5ad(path)
        return ad.read_h5ad(path, backed="r")

    return make


def _set(array: np.ndarray, value, dtype=np.float32) -> np.ndarray:
    array = np.asarray(array, dtype=dtype).copy()
    array[2, 3] = value
    return array


def _dense(X) -> np.ndarray:
    return X.toarray()


def _counts(X) -> sp.csr_matrix:
    X = X.copy()
    X.data = (1 + np.arange(X.nnz) % 5).astype(np.float32)  # counts 1..5
    return X


def _fractions(X) -> sp.csr_matrix:
    X = X.copy()
    X.data = (0.05 + 0.9 * (np.arange(X.nnz) % 7) / 7).astype(np.float32)
    return X


def _layer_only(adata: ad.AnnData) -> None:
    adata.layers["counts"] = _counts(adata.X)
    adata.X = sp.csr_matrix(adata.shape, dtype=np.float32)  # X empty; the layer is the data


def _no_x(adata: ad.AnnData) -> None:
    adata.X = None


def _duplicate_names(adata: ad.AnnData) -> None:
    names = adata.var_names.to_numpy().copy()
    names[5] = names[4]
    adata.var_names = names


def _empty_cells_and_peaks(adata: ad.AnnData) -> None:
    X = adata.X.tolil()
    X[:6, :] = 0
    X[:, :4] = 0
    adata.X = X.tocsr()
    adata.X.eliminate_zeros()


def _obs(key: str, values) -> Callable[[ad.AnnData], None]:
    def edit(adata: ad.AnnData) -> None:
        adata.obs[key] = values

    return edit


_DEPTH = np.arange(N_CELLS, dtype=np.float64)
_DONOR = np.array(["d1", "d2", "d3"] * (N_CELLS // 3), dtype=object)


def _with(array: np.ndarray, index: int, value) -> np.ndarray:
    array = array.copy()
    array[index] = value
    return array


@dataclass
class Case:
    """One row: how to make the input, what to call, and what must happen."""

    make: Callable[[Path], ad.AnnData]
    setup: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    error: type[Exception] | None = None
    match: str | None = None
    warns: str | None = None
    reference: str | None = "memory"


CASES: dict[str, Case] = {
    # values
    "negative dense": Case(
        with_x(lambda X: _set(X.toarray(), -1.0)), error=ValueError, match="negative values"
    ),
    "negative csr": Case(
        with_x(lambda X: sp.csr_matrix(_set(X.toarray(), -2.0))),
        error=ValueError,
        match="negative values",
    ),
    "negative int": Case(
        with_x(lambda X: _set(X.toarray(), -1, np.int64)),
        error=ValueError,
        match="negative values",
    ),
    "negative in layer": Case(
        edited(lambda a: a.layers.__setitem__("counts", _set(a.X.toarray(), -1.0))),
        setup={"layer": "counts"},
        error=ValueError,
        match=r"adata.layers\['counts'\].*negative",
    ),
    "nan dense": Case(with_x(lambda X: _set(X.toarray(), np.nan)), error=ValueError, match="NaN"),
    "nan csc": Case(
        with_x(lambda X: sp.csc_matrix(_set(X.toarray(), np.nan))), error=ValueError, match="NaN"
    ),
    "inf csr": Case(
        with_x(lambda X: sp.csr_matrix(_set(X.toarray(), np.inf))),
        error=ValueError,
        match="infinite",
    ),
    "-inf dense": Case(
        with_x(lambda X: _set(X.toarray(), -np.inf)), error=ValueError, match="infinite"
    ),
    "strings": Case(with_x(lambda X: X.toarray().astype(str)), error=TypeError, match="dtype"),
    "complex": Case(
        with_x(lambda X: X.toarray().astype(np.complex64)), error=TypeError, match="dtype"
    ),
    "object": Case(with_x(lambda X: X.toarray().astype(object)), error=TypeError, match="dtype"),
    # shape and structure
    "no cells": Case(lambda p: reference()[:0].copy(), error=ValueError, match="empty"),
    "no peaks": Case(lambda p: reference()[:, :0].copy(), error=ValueError, match="empty"),
    "X is None": Case(edited(_no_x), error=ValueError, match="adata.X is None"),
    "missing layer": Case(
        edited(lambda a: None),
        setup={"layer": "counts"},
        error=ValueError,
        match="'counts' is not in adata.layers",
    ),
    "missing batch key": Case(
        edited(lambda a: None),
        setup={"batch_key": "sample"},
        error=ValueError,
        match="batch_key='sample' is not a column",
    ),
    "missing covariate": Case(
        edited(lambda a: None),
        setup={"categorical_covariate_keys": ["donor"]},
        error=ValueError,
        match="categorical_covariate_keys='donor'",
    ),
    "missing continuous covariate": Case(
        edited(lambda a: None),
        setup={"continuous_covariate_keys": ["depth", "tss"]},
        error=ValueError,
        match="continuous_covariate_keys='tss'",
    ),
    "nan continuous covariate": Case(
        edited(_obs("depth", _with(_DEPTH, 7, np.nan))),
        setup={"continuous_covariate_keys": ["depth"]},
        error=ValueError,
        match=r"adata.obs\['depth'\] \(continuous_covariate_keys\) has 1 NaN or infinite",
    ),
    "inf continuous covariate": Case(
        edited(_obs("depth", _with(_DEPTH, 7, -np.inf))),
        setup={"continuous_covariate_keys": ["depth"]},
        error=ValueError,
        match=r"has 1 NaN or infinite values \(first in cell 'cell_7'\)",
    ),
    "text continuous covariate": Case(
        edited(_obs("donor", _DONOR)),
        setup={"continuous_covariate_keys": ["donor"]},
        error=TypeError,
        match=r"must be numeric.*categorical_covariate_keys",
    ),
    "nan categorical covariate": Case(
        edited(_obs("donor", _with(_DONOR, 4, np.nan))),
        setup={"categorical_covariate_keys": ["donor"]},
        error=ValueError,
        match=r"adata.obs\['donor'\] \(categorical_covariate_keys\) has 1 missing \(NaN\)",
    ),
    "nan batch": Case(
        edited(_obs("sample", pd.Categorical(_with(_DONOR, 4, None)))),
        setup={"batch_key": "sample"},
        error=ValueError,
        match=r"adata.obs\['sample'\] \(batch_key\) has 1 missing",
    ),
    "duplicate peak names": Case(
        edited(_duplicate_names),
        error=ValueError,
        match=r"duplicated peak names.*var_names_make_unique",
    ),
    # n_centroids
    "n_centroids 0": Case(
        edited(lambda a: None),
        model={"n_centroids": 0},
        error=ValueError,
        match="n_centroids=0 is out of range",
    ),
    "n_centroids negative": Case(
        edited(lambda a: None),
        model={"n_centroids": -3},
        error=ValueError,
        match="n_centroids=-3 is out of range",
    ),
    "n_centroids above n_cells": Case(
        edited(lambda a: None),
        model={"n_centroids": N_CELLS + 1},
        error=ValueError,
        match=f"number of cells \\({N_CELLS}\\)",
    ),
    "n_centroids float": Case(
        edited(lambda a: None),
        model={"n_centroids": 4.5},
        error=TypeError,
        match="n_centroids must be an integer",
    ),
    "n_centroids bool": Case(
        edited(lambda a: None),
        model={"n_centroids": True},
        error=TypeError,
        match="n_centroids must be an integer",
    ),
    # architecture and training arguments
    "n_latent 0": Case(
        edited(lambda a: None),
        model={"n_latent": 0},
        error=ValueError,
        match="n_latent=0 is out of range: it must be at least 1",
    ),
    "n_latent negative": Case(
        edited(lambda a: None), model={"n_latent": -2}, error=ValueError, match="n_latent=-2"
    ),
    "n_latent float": Case(
        edited(lambda a: None),
        model={"n_latent": 2.5},
        error=TypeError,
        match="n_latent must be an integer, got 2.5",
    ),
    "n_hidden zero width": Case(
        edited(lambda a: None),
        model={"n_hidden": (0,)},
        error=ValueError,
        match=r"n_hidden\[0\]=0 is out of range.*at least one unit",
    ),
    "n_hidden int": Case(
        edited(lambda a: None),
        model={"n_hidden": 128},
        error=TypeError,
        match=r"n_hidden must be a sequence of layer widths, e.g. \(128,\)",
    ),
    "batch_size 0": Case(
        edited(lambda a: None),
        train={"batch_size": 0},
        error=ValueError,
        match="batch_size=0 is out of range",
    ),
    "batch_size 1 with batch norm": Case(
        edited(lambda a: None),
        model={"use_batch_norm": "encoder"},
        train={"batch_size": 1},
        error=ValueError,
        match=r"batch_size=1 .*at least 2 \(batch normalization",
    ),
    "early stopping without validation": Case(
        edited(lambda a: None),
        train={"early_stopping": True, "train_size": 1.0},
        error=ValueError,
        match=r"early_stopping=True .*no cells are held out.*train_size < 1",
    ),
    "train_size 0": Case(
        edited(lambda a: None),
        train={"train_size": 0},
        error=ValueError,
        match=r"train_size=0 is out of range.*\(0, 1\]",
    ),
    "train_size above 1": Case(
        edited(lambda a: None), train={"train_size": 1.5}, error=ValueError, match="train_size=1.5"
    ),
    # accepted formats: same model as the reference
    "reference csr float32": Case(edited(lambda a: None)),
    "csc": Case(with_x(lambda X: X.tocsc())),
    "dense float32": Case(with_x(_dense)),
    "dense float64": Case(with_x(lambda X: X.toarray().astype(np.float64))),
    "csr int32": Case(with_x(lambda X: X.astype(np.int32))),
    "dense int64": Case(with_x(lambda X: X.toarray().astype(np.int64))),
    "bool": Case(with_x(lambda X: X.astype(bool))),
    "counts": Case(with_x(_counts)),
    "non-integer values": Case(with_x(_fractions)),
    "csr not canonical": Case(
        with_x(not_canonical), warns=r"adata.X is a sparse matrix with duplicate entries"
    ),
    "layer": Case(edited(_layer_only), setup={"layer": "counts"}),
    "batch key": Case(edited(lambda a: None), setup={"batch_key": "batch"}, reference=None),
    # a tenth of the cells is held out by default: the mixture is fitted to the other 108
    "n_centroids = n_training_cells": Case(
        edited(lambda a: None), model={"n_centroids": N_CELLS - N_CELLS // 10}, reference=None
    ),
    "n_centroids > n_training_cells": Case(
        edited(lambda a: None),
        model={"n_centroids": N_CELLS},
        train={"max_epochs": 2},
        error=ValueError,
        match=r"Cannot fit 120 mixture components to 108 training cells .*train_size=1.0",
    ),
    "n_centroids numpy int": Case(edited(lambda a: None), model={"n_centroids": np.int64(4)}),
    # A backed minibatch is read in sorted cell order (h5py needs it), so its cells draw
    # other noise than in memory: backed runs agree with each other, and the trained model
    # reads a backed file exactly as it reads memory (test_backed_inference_matches_memory).
    "backed csr": Case(backed(lambda X: X), reference="backed"),
    "backed csc": Case(backed(lambda X: X.tocsc()), reference="backed"),
    "backed dense": Case(backed(_dense), reference="backed"),
    "empty cells and peaks": Case(
        edited(_empty_cells_and_peaks),
        reference=None,
        warns=r"6 cells of adata.X have no accessible peak",
    ),
}


def _hash(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _snapshot(adata: ad.AnnData) -> dict:
    if adata.isbacked:
        return {"file": _hash(adata.filename), "obs": adata.obs.copy(), "var": adata.var.copy()}

    def copy(m):
        return None if m is None else m.copy()

    return {
        "X": copy(adata.X),
        "layers": {k: copy(v) for k, v in adata.layers.items()},
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "uns": set(adata.uns),
        "obsm": set(adata.obsm),
    }


def _same_matrix(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if type(a) is not type(b) or a.dtype != b.dtype or a.shape != b.shape:
        return False
    if sp.issparse(a):
        return (
            a.format == b.format
            and np.array_equal(a.indptr, b.indptr)
            and np.array_equal(a.indices, b.indices)
            and np.array_equal(a.data, b.data, equal_nan=a.dtype.kind in "fc")
        )
    return np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")


def assert_unchanged(adata: ad.AnnData, before: dict) -> None:
    """Only ``obs['_scvi_*']`` and ``uns['_scvi_*']`` may have been added."""
    obs = adata.obs[[c for c in adata.obs.columns if not c.startswith("_scvi_")]]
    pd.testing.assert_frame_equal(obs, before["obs"])
    pd.testing.assert_frame_equal(adata.var, before["var"])
    if "file" in before:
        assert adata.isbacked
        assert _hash(adata.filename) == before["file"]
        return
    assert _same_matrix(adata.X, before["X"]), "adata.X was modified"
    assert set(adata.layers) == set(before["layers"])
    for key, value in before["layers"].items():
        assert _same_matrix(adata.layers[key], value), f"adata.layers[{key!r}] was modified"
    assert {k for k in adata.uns if not k.startswith("_scvi")} == before["uns"]
    assert set(adata.obsm) == before["obsm"]


def train_latent(adata: ad.AnnData, setup: dict | None = None, **model_kwargs) -> np.ndarray:
    """Set up, train briefly with a fixed seed, and return the latent means."""
    scvi.settings.seed = 0
    SCALE.setup_anndata(adata, **(setup or {}))
    model = SCALE(adata, **{**MODEL_KWARGS, **model_kwargs})
    model.train(**TRAIN_KWARGS)
    return model.get_latent_representation()


@pytest.fixture(scope="module")
def memory_reference_latent() -> np.ndarray:
    return train_latent(reference())


@pytest.fixture(scope="module")
def backed_reference_latent(tmp_path_factory) -> np.ndarray:
    return train_latent(backed(lambda X: X)(tmp_path_factory.mktemp("backed")))


@pytest.mark.parametrize("name", list(CASES))
def test_input(name: str, tmp_path: Path, request) -> None:
    case = CASES[name]
    adata = case.make(tmp_path)
    before = _snapshot(adata)
    try:
        if case.error is not None:
            with pytest.raises(case.error, match=case.match):
                SCALE.setup_anndata(adata, **case.setup)
                model = SCALE(adata, **{**MODEL_KWARGS, **case.model})
                if case.train:
                    model.train(**{**TRAIN_KWARGS, **case.train})
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            latent = train_latent(adata, case.setup, **case.model)
        messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        if case.warns is not None:
            assert any(re.search(case.warns, m) for m in messages), messages
        assert latent.shape == (N_CELLS, MODEL_KWARGS["n_latent"])
        assert np.isfinite(latent).all()
        if case.reference is not None:
            expected = request.getfixturevalue(f"{case.reference}_reference_latent")
            np.testing.assert_allclose(latent, expected, rtol=0, atol=1e-5)
    finally:
        assert_unchanged(adata, before)


def test_clean_input_does_not_warn() -> None:
    adata = reference()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*carry no signal.*")
        SCALE.setup_anndata(adata)


def test_backed_training_reads_from_disk(tmp_path: Path) -> None:
    """Training from a backed file keeps the AnnData backed: X is never loaded whole."""
    adata = backed(lambda X: X)(tmp_path)
    train_latent(adata)
    assert adata.isbacked
    assert not isinstance(adata.X, np.ndarray | sp.spmatrix)


def test_backed_inference_matches_memory(tmp_path: Path) -> None:
    """A model trained in memory gives the same outputs on the same data read from disk."""
    adata = reference()
    scvi.settings.seed = 0
    SCALE.setup_anndata(adata)
    model = SCALE(adata, **MODEL_KWARGS)
    model.train(**{**TRAIN_KWARGS, "max_epochs": 1})
    on_disk = backed(lambda X: X)(tmp_path)
    SCALE.setup_anndata(on_disk)
    np.testing.assert_array_equal(
        model.get_latent_representation(on_disk, batch_size=40),
        model.get_latent_representation(adata, batch_size=40),
    )
    np.testing.assert_array_equal(
        model.get_cluster_probabilities(on_disk), model.get_cluster_probabilities(adata)
    )


@pytest.mark.parametrize("wrong", ["array", "mudata"])
def test_setup_anndata_rejects_other_types(wrong: str) -> None:
    obj = reference().X.toarray() if wrong == "array" else MuData({"atac": reference()})
    with pytest.raises(TypeError, match="setup_anndata takes an AnnData"):
        SCALE.setup_anndata(obj)


@pytest.mark.skipif(not hasattr(SCALE, "setup_mudata"), reason="SCALE.setup_mudata not available")
@pytest.mark.parametrize(
    ("modalities", "match"),
    [
        ({"atac_layer": "atac", "rna_layer": "rna"}, "Modality 'rna'.*is not in mdata.mod"),
        ({"atac_layer": "peaks"}, "Modality 'peaks'.*is not in mdata.mod"),
    ],
)
def test_mudata_missing_modality(modalities: dict, match: str) -> None:
    mdata = MuData({"atac": reference()})
    before = _snapshot(mdata.mod["atac"])
    with pytest.raises(ValueError, match=match):
        SCALE.setup_mudata(mdata, modalities=modalities)
    assert_unchanged(mdata.mod["atac"], before)


def test_n_centroids_above_the_training_cells() -> None:
    """n_centroids may not exceed the cells the mixture is fitted on (train_size < 1)."""
    adata = reference()
    SCALE.setup_anndata(adata)
    model = SCALE(adata, **{**MODEL_KWARGS, "n_centroids": 100})
    with pytest.raises(ValueError, match=r"Cannot fit 100 mixture components to 60 training"):
        model.train(**{**TRAIN_KWARGS, "max_epochs": 1}, train_size=0.5)


def test_dense_validation_reads_bounded_blocks(monkeypatch) -> None:
    """A dense matrix is checked in blocks of bounded size, and a bad value in a late block
    is still found."""
    from scale_scvi.model import _validation

    monkeypatch.setattr(_validation, "_CHUNK_VALUES", 10 * N_PEAKS)
    sizes = [b.shape[0] for b in _validation._row_blocks(reference().X.toarray())]
    assert max(sizes) == 10 and sum(sizes) == N_CELLS
    X = reference().X.toarray()
    X[-1, -1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        _validation.validate_accessibility_matrix(X)


@pytest.mark.skipif(not hasattr(SCALE, "setup_mudata"), reason="SCALE.setup_mudata not available")
@pytest.mark.parametrize(
    ("value", "match"),
    [(-1.0, "negative values; SCALE needs raw counts of expression"), (np.nan, "setup_mudata")],
    ids=["negative", "nan"],
)
def test_rna_messages_speak_of_expression(value, match: str) -> None:
    """Errors about the RNA modality name expression and setup_mudata, not accessibility."""
    from scale_scvi.data import simulate_multiome

    mdata = simulate_multiome(n_cells=30, n_peaks=20, n_genes=10, n_types=2, seed=0)
    rna = mdata.mod["rna"]
    rna.X = _set(rna.X.toarray() if sp.issparse(rna.X) else rna.X, value)
    with pytest.raises(ValueError, match=match) as info:
        SCALE.setup_mudata(mdata)
    assert "accessib" not in str(info.value) and "setup_anndata" not in str(info.value)


def test_mudata_covariate_values_are_checked() -> None:
    from scale_scvi.data import simulate_multiome

    mdata = simulate_multiome(n_cells=30, n_peaks=20, n_genes=10, n_types=2, seed=0)
    mdata.obs["depth"] = _with(np.arange(30, dtype=np.float64), 2, np.nan)
    with pytest.raises(ValueError, match=r"mdata.obs\['depth'\] .*1 NaN or infinite"):
        SCALE.setup_mudata(mdata, continuous_covariate_keys=["depth"])
