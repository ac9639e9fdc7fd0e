"""Saving and loading: exact round trips, clear errors on other peaks, old models keep loading."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
import torch

from scale_scvi import SCALE
from scale_scvi.data import simulate_scatac

DATA = Path(__file__).parent / "data"
FIXTURE = "scale_model_v0.1.0"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[SCALE, Path]:
    scvi.settings.seed = 0
    adata = simulate_scatac(n_cells=80, n_peaks=90, n_types=3, density=(0.1, 0.2), seed=8)
    adata.obs["batch"] = pd.Categorical(np.where(np.arange(80) % 3, "x", "y"))
    SCALE.setup_anndata(adata, batch_key="batch")
    model = SCALE(adata, n_centroids=3, n_latent=4, n_hidden=(16,))
    model.train(max_epochs=3, batch_size=20, enable_progress_bar=False)
    path = tmp_path_factory.mktemp("saved") / "model"
    model.save(path, save_anndata=True)
    return model, path


def _assert_same_model(a: SCALE, b: SCALE) -> None:
    assert a.init_params_ == b.init_params_
    state_a, state_b = a.module.state_dict(), b.module.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        np.testing.assert_array_equal(state_a[key].numpy(), state_b[key].numpy(), err_msg=key)
    np.testing.assert_array_equal(a.get_latent_representation(), b.get_latent_representation())
    np.testing.assert_array_equal(a.get_cluster_probabilities(), b.get_cluster_probabilities())
    np.testing.assert_array_equal(
        a.get_normalized_accessibility(), b.get_normalized_accessibility()
    )


def test_round_trip_with_data(trained) -> None:
    model, path = trained
    adata = model.adata.copy()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*var_names.*")
        loaded = SCALE.load(path, adata=adata)
    assert loaded.is_trained
    _assert_same_model(model, loaded)
    for key in model.history:
        pd.testing.assert_frame_equal(model.history[key], loaded.history[key])


def test_round_trip_with_saved_data(trained) -> None:
    model, path = trained
    loaded = SCALE.load(path)
    _assert_same_model(model, loaded)
    assert loaded.adata.obs_names.equals(model.adata.obs_names)


def test_load_on_new_cells_with_the_same_peaks(trained) -> None:
    model, path = trained
    new = model.adata[::2].copy()
    loaded = SCALE.load(path, adata=new)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation(new)
    )


def _renamed(adata):
    names = adata.var_names.to_numpy().copy()
    names[7] = "chr1:100-600"
    adata.var_names = names
    return adata


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_renamed, r"1 of its 90 peaks differ .*position 7.*'chr1:100-600'"),
        (lambda a: a[:, ::-1].copy(), r"90 of its 90 peaks differ or are in another order"),
        (lambda a: a[:, :60].copy(), r"the model has 90 peaks and adata has 60"),
        (
            lambda a: ad.concat([a, a[:, :5].copy()], axis=1, merge="first"),
            r"the model has 90 peaks and adata has 95",
        ),
    ],
    ids=["renamed", "reordered", "fewer", "more"],
)
def test_load_on_other_peaks_raises(trained, change, match) -> None:
    model, path = trained
    other = change(model.adata.copy())
    other.var_names_make_unique()
    with pytest.raises(ValueError, match=match) as info:
        SCALE.load(path, adata=other)
    assert "prepare_query_anndata" in str(info.value)


def test_load_without_the_batch_key_raises(trained) -> None:
    model, path = trained
    adata = model.adata.copy()
    del adata.obs["batch"]
    with pytest.raises(ValueError, match="batch_key='batch' is not a column"):
        SCALE.load(path, adata=adata)


def test_saved_model_of_0_1_0_still_loads() -> None:
    """A model saved by version 0.1.0 (tests/data/make_fixture.py) loads and gives its outputs."""
    expected = np.load(DATA / f"{FIXTURE}_expected.npz")
    for adata in (None, ad.read_h5ad(DATA / FIXTURE / "adata.h5ad")):
        model = SCALE.load(DATA / FIXTURE, adata=adata)
        assert model.is_trained
        assert model.module.n_centroids == 3 and model.module.n_latent == 4
        assert model.summary_stats.n_batch == 2
        np.testing.assert_allclose(
            model.get_latent_representation(), expected["latent"], rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            model.get_cluster_probabilities(),
            expected["cluster_probabilities"],
            rtol=1e-4,
            atol=1e-6,
        )
        np.testing.assert_allclose(
            model.get_normalized_accessibility(), expected["accessibility"], rtol=1e-5, atol=1e-6
        )


@pytest.mark.skipif(not hasattr(SCALE, "setup_mudata"), reason="SCALE.setup_mudata not available")
def test_mudata_model_on_other_features_raises(tmp_path: Path) -> None:
    from scale_scvi.data import simulate_multiome

    scvi.settings.seed = 0
    mdata = simulate_multiome(n_cells=60, n_peaks=50, n_genes=30, n_types=2, seed=0)
    SCALE.setup_mudata(mdata)
    model = SCALE(mdata, n_centroids=2, n_hidden=(16,))
    model.train(max_epochs=1, enable_progress_bar=False)
    model.save(tmp_path / "mm")
    loaded = SCALE.load(tmp_path / "mm", adata=mdata.copy())
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    other = mdata.copy()
    other.mod["rna"].var_names = [f"renamed_{i}" for i in range(other.mod["rna"].n_vars)]
    other.update()
    with pytest.raises(ValueError, match=r"mdata\['rna'\] does not have the features"):
        SCALE.load(tmp_path / "mm", adata=other)


@pytest.mark.skipif(not hasattr(SCALE, "setup_mudata"), reason="SCALE.setup_mudata not available")
def test_mudata_model_saved_under_the_earlier_defaults_loads(tmp_path: Path) -> None:
    """A multimodal model file from before MoPoE with learned weights became the default
    (no posterior or mixture weights recorded, no component_logits) loads as the mixture of
    experts with equal weights it was; saved again, it records its settings."""
    from scale_scvi.data import simulate_multiome

    scvi.settings.seed = 0
    mdata = simulate_multiome(n_cells=60, n_peaks=50, n_genes=30, n_types=2, seed=0)
    SCALE.setup_mudata(mdata)
    model = SCALE(mdata, n_centroids=2, n_hidden=(16,), posterior="moe", mixture_weights="equal")
    model.train(max_epochs=1, enable_progress_bar=False)
    model.save(tmp_path / "mm")
    # rewrite the file as the earlier default wrote it: neither setting in init_params_
    path = tmp_path / "mm" / "model.pt"
    saved = torch.load(path, weights_only=False)
    module_kwargs = saved["attr_dict"]["init_params_"]["kwargs"]["module_kwargs"]
    assert module_kwargs == {"posterior": "moe", "mixture_weights": "equal"}
    module_kwargs.clear()
    torch.save(saved, path)

    loaded = SCALE.load(tmp_path / "mm", adata=mdata.copy())
    assert loaded.module.settings == {"posterior": "moe", "mixture_weights": "equal"}
    expected = model.get_latent_representation()
    np.testing.assert_array_equal(loaded.get_latent_representation(), expected)
    loaded.save(tmp_path / "again")
    again = SCALE.load(tmp_path / "again", adata=mdata.copy())
    assert again.module.settings == {"posterior": "moe", "mixture_weights": "equal"}
    np.testing.assert_array_equal(again.get_latent_representation(), expected)
    # the default model records its own settings
    SCALE.setup_mudata(mdata)
    default = SCALE(mdata, n_centroids=2, n_hidden=(16,))
    default.train(max_epochs=1, enable_progress_bar=False)
    default.save(tmp_path / "default")
    reloaded = SCALE.load(tmp_path / "default", adata=mdata.copy())
    assert reloaded.module.settings == {"posterior": "mopoe", "mixture_weights": "learned"}
    np.testing.assert_array_equal(
        reloaded.get_latent_representation(), default.get_latent_representation()
    )
