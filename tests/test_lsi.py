"""The encoder's LSI input: the projection, its fit, and the model's choice of input."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.decomposition import TruncatedSVD

from scale_scvi import SCALE
from scale_scvi.data import simulate_multiome, simulate_scatac
from scale_scvi.model._scale import LSI_BELOW_CELLS, N_LSI, default_n_lsi
from scale_scvi.module import SCALEVAE, LSIProjection
from scale_scvi.module._constants import MODULE_KEYS


def _counts(n_cells=60, n_peaks=80, seed=0) -> sp.csr_matrix:
    X = sp.random(n_cells, n_peaks, density=0.15, format="csr", random_state=seed)
    X.data = np.ceil(X.data * 3).astype(np.float32)  # counts 1-3: the fit binarizes them
    return X.astype(np.float32)


def test_projection_is_lsi_of_the_fitted_cells() -> None:
    X = _counts()
    lsi = LSIProjection(X.shape[1], 10).fit(X, seed=0)
    # LSI written out: TF-IDF of the binarized peaks, log1p, SVD, first component dropped
    B = (X > 0).astype(np.float64).toarray()
    idf = B.shape[0] / np.maximum(B.sum(0), 1)
    T = np.log1p(1e4 * B * idf / np.maximum(B.sum(1, keepdims=True), 1))
    coords = TruncatedSVD(11, algorithm="randomized", n_iter=7, random_state=0).fit_transform(
        sp.csr_matrix(T)
    )[:, 1:]
    expected = coords / np.linalg.norm(coords, axis=1, keepdims=True) * np.sqrt(10)
    got = lsi(torch.as_tensor(B, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_dense_and_sparse_minibatches_give_the_same_coordinates() -> None:
    X = _counts()
    lsi = LSIProjection(X.shape[1], 8).fit(X)
    B = (X[:12] > 0).astype(np.float32)
    B[0] = 0  # a cell with no open peak: coordinates 0, not NaN
    dense = torch.as_tensor(B.toarray())
    sparse = dense.to_sparse_csr()
    out = lsi(dense)
    np.testing.assert_allclose(out.numpy(), lsi(sparse).numpy(), atol=1e-5)
    assert torch.isfinite(out).all() and float(out[0].abs().sum()) == 0.0


def test_fit_reads_dense_sparse_backed_and_chunked_alike(tmp_path) -> None:
    X = _counts(n_cells=50)
    path = tmp_path / "x.h5ad"
    ad.AnnData(X).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    index = np.arange(0, X.shape[1], 2)
    ref = LSIProjection(len(index), 6).fit(X, peak_index=index)
    for matrix, chunk in [(X.toarray(), 10_000), (X, 7), (backed.X, 9)]:
        other = LSIProjection(len(index), 6).fit(matrix, peak_index=index, chunk=chunk)
        np.testing.assert_allclose(other.idf.numpy(), ref.idf.numpy())
        np.testing.assert_allclose(
            np.abs(other.basis.numpy()), np.abs(ref.basis.numpy()), atol=1e-5
        )
    backed.file.close()


def test_fit_on_a_sample_of_the_cells_and_on_fewer_cells_than_coordinates() -> None:
    X = _counts(n_cells=300)
    lsi = LSIProjection(X.shape[1], 5).fit(X, max_cells=100, chunk=64)
    assert lsi.idf.shape == (X.shape[1],) and float(lsi.basis.abs().sum()) > 0
    few = LSIProjection(X.shape[1], 30).fit(X[:8])  # 8 cells: 6 coordinates, the rest 0
    assert int((few.basis.abs().sum(0) > 0).sum()) == 6
    assert torch.isfinite(few(torch.as_tensor((X[:8] > 0).toarray(), dtype=torch.float32))).all()


def test_default_input_follows_the_number_of_cells() -> None:
    assert default_n_lsi(LSI_BELOW_CELLS - 1) == N_LSI
    assert default_n_lsi(LSI_BELOW_CELLS) is None
    adata = simulate_scatac(n_cells=120, n_peaks=90, n_types=3, seed=0)
    SCALE.setup_anndata(adata)
    model = SCALE(adata)
    assert model.module.n_lsi == N_LSI and model.init_params_["non_kwargs"]["n_lsi"] == N_LSI
    assert model.module.z_encoder.first_layer.weight.shape[1] == N_LSI
    assert f"reads {N_LSI} LSI coordinates" in model._model_summary_string
    peaks = SCALE(adata, n_lsi=None)
    assert peaks.module.lsi is None
    assert peaks.module.z_encoder.first_layer.weight.shape[1] == peaks.module.n_peaks
    assert SCALE(adata, n_lsi=12).module.n_lsi == 12


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "lsi"])
def test_bad_n_lsi_is_refused(bad) -> None:
    adata = simulate_scatac(n_cells=40, n_peaks=50, n_types=2, seed=0)
    SCALE.setup_anndata(adata)
    with pytest.raises(ValueError, match="n_lsi must be a positive integer or None"):
        SCALE(adata, n_lsi=bad)


def test_multimodal_model_refuses_n_lsi() -> None:
    mdata = simulate_multiome(n_cells=40, n_peaks=30, n_genes=20, n_types=2, seed=0)
    SCALE.setup_mudata(mdata, modalities={"atac_layer": "atac", "rna_layer": "rna"})
    with pytest.raises(ValueError, match="n_lsi is an argument of the model of ATAC alone"):
        SCALE(mdata, n_lsi=30)


def test_state_dict_of_an_encoder_of_the_peaks_loads_into_a_default_module() -> None:
    torch.manual_seed(0)
    old = SCALEVAE(n_input=50, n_centroids=3, n_lsi=None)
    new = SCALEVAE(n_input=50, n_centroids=3, n_lsi=20)
    new.load_state_dict(old.state_dict())
    assert new.lsi is None and new.n_lsi is None
    x = (torch.rand(6, 50) < 0.3).float()
    old.eval()
    new.eval()
    torch.testing.assert_close(
        new.inference(x)[MODULE_KEYS.QZM_KEY],
        old.inference(x)[MODULE_KEYS.QZM_KEY],
        rtol=0,
        atol=0,
    )


def test_trained_model_maps_new_cells_with_its_own_basis(tmp_path) -> None:
    adata = simulate_scatac(n_cells=150, n_peaks=100, n_types=3, seed=2)
    SCALE.setup_anndata(adata)
    model = SCALE(adata)
    model.train(max_epochs=3, enable_progress_bar=False)
    basis = model.module.lsi.basis.clone()
    model.save(tmp_path / "m")
    query = adata[:40].copy()
    loaded = SCALE.load(tmp_path / "m", adata=query)  # a fit to 40 cells would differ
    torch.testing.assert_close(loaded.module.lsi.basis, basis, rtol=0, atol=0)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation(query)
    )


def test_load_and_query_mapping_fit_nothing_on_the_data(tmp_path, monkeypatch) -> None:
    adata = simulate_scatac(n_cells=150, n_peaks=100, n_types=3, seed=2)
    adata.obs["batch"] = "ref"
    SCALE.setup_anndata(adata, batch_key="batch")
    model = SCALE(adata)
    model.train(max_epochs=2, enable_progress_bar=False)
    model.save(tmp_path / "m")
    state = {k: v.clone() for k, v in model.module.state_dict().items()}

    def refuse(*args, **kwargs):
        raise AssertionError("fitted on the data of a model whose state is saved")

    monkeypatch.setattr(SCALEVAE, "init_from_data", refuse)
    loaded = SCALE.load(tmp_path / "m", adata=adata[:40].copy())
    for key, value in loaded.module.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    query = adata[:40].copy()
    query.obs["batch"] = "query"
    mapped = SCALE.load_query_data(query, tmp_path / "m")
    torch.testing.assert_close(mapped.module.lsi.basis, state["lsi.basis"], rtol=0, atol=0)
    torch.testing.assert_close(
        mapped.module.log_mean_depth, state["log_mean_depth"], rtol=0, atol=0
    )
    fresh = adata.copy()
    SCALE.setup_anndata(fresh, batch_key="batch")
    with pytest.raises(AssertionError, match="fitted on the data"):
        SCALE(fresh)  # a new model still fits its basis and decoder bias


def test_summary_says_what_a_loaded_encoder_reads() -> None:
    adata = simulate_scatac(n_cells=60, n_peaks=50, n_types=2, seed=1)
    SCALE.setup_anndata(adata)
    model = SCALE(adata)
    assert f"reads {N_LSI} LSI coordinates" in model._model_summary_string
    # the state dict of a model saved before the LSI input: its encoder reads the peaks
    model.module.load_state_dict(SCALE(adata, n_lsi=None).module.state_dict())
    assert model.module.lsi is None and "LSI" not in model._model_summary_string
