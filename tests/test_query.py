"""Reference/query mapping (scArches): the reference's prior and encoder are kept, and the
query is read on the reference's peaks."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scale_scvi import SCALE
from scale_scvi.data import simulate_scatac


def test_query_training_keeps_the_reference_prior():
    adata = simulate_scatac(n_cells=160, n_peaks=200, n_types=3, seed=0)
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2 == 0, "ref", "query")
    reference = adata[adata.obs["batch"] == "ref"].copy()
    query = adata[adata.obs["batch"] == "query"].copy()
    SCALE.setup_anndata(reference, batch_key="batch")
    model = SCALE(reference, n_centroids=3, n_hidden=(16,))
    model.train(max_epochs=3, enable_progress_bar=False)
    prior = {k: v.detach().clone() for k, v in model.module.prior.state_dict().items()}

    query_model = SCALE.load_query_data(query, model)
    before = {k: v.detach().clone() for k, v in query_model.module.state_dict().items()}
    query_model.train(max_epochs=3, enable_progress_bar=False)  # the default weight decay
    for key, value in query_model.module.prior.state_dict().items():
        torch.testing.assert_close(value, prior[key], rtol=0, atol=0)
    # The query's own batch column of the decoder did train.
    key = "decoder.output.fc_layers.Layer 0.0.weight"
    assert not torch.equal(before[key][:, -1], query_model.module.state_dict()[key][:, -1])
    # Everything of the reference stayed as it was, to the bit: the weights and biases that
    # scArches' hooks keep (partly) fixed are not decayed either. Only the weight columns of
    # the new batch category (the last one of a layer that takes the batch) moved.
    hooked = {name for name, p in query_model.module.named_parameters() if p._backward_hooks}
    assert hooked, "scArches marks the layers that take the batch with gradient hooks"
    for key, value in query_model.module.state_dict().items():
        if key in hooked and value.dim() == 2:
            torch.testing.assert_close(value[:, :-1], before[key][:, :-1], rtol=0, atol=0)
        else:
            torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    probs = query_model.get_cluster_probabilities()
    # the reference's clusters (its components left on after training)
    assert query_model.n_clusters_ == model.n_clusters_
    assert probs.shape == (query.n_obs, model.n_clusters_)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_train_refuses_plan_kwargs_it_would_override():
    """Optimizer settings in plan_kwargs would be overridden by train()'s own arguments: a
    conflicting value is refused with the argument to use, an equal one is accepted."""
    adata = simulate_scatac(n_cells=60, n_peaks=80, n_types=2, seed=0)
    SCALE.setup_anndata(adata)
    model = SCALE(adata, n_centroids=2, n_hidden=(8,))
    with pytest.raises(ValueError, match=r"Pass weight_decay=0.0 to train\(\)"):
        model.train(max_epochs=1, plan_kwargs={"weight_decay": 0.0})
    with pytest.raises(ValueError, match="Pass n_epochs_kl_warmup=5"):
        model.train(max_epochs=1, plan_kwargs={"n_epochs_kl_warmup": 5})
    with pytest.raises(ValueError, match="optimizer"):
        model.train(max_epochs=1, plan_kwargs={"optimizer": "Adam"})
    assert not model.is_trained_
    model.train(
        max_epochs=1,
        weight_decay=0.0,
        plan_kwargs={"weight_decay": 0.0},
        enable_progress_bar=False,
    )
    assert model.is_trained_


def _reference_and_query(n_reference_batches: int):
    adata = simulate_scatac(n_cells=180, n_peaks=150, n_types=3, density=(0.1, 0.2), seed=1)
    labels = ["query"] + [f"ref{i}" for i in range(n_reference_batches)]
    adata.obs["batch"] = np.asarray(labels)[np.arange(adata.n_obs) % len(labels)]
    reference = adata[adata.obs["batch"] != "query"].copy()
    query = adata[adata.obs["batch"] == "query"].copy()
    SCALE.setup_anndata(reference, batch_key="batch")
    model = SCALE(reference, n_centroids=3, n_hidden=(16,))
    model.train(max_epochs=3, enable_progress_bar=False)
    return model, query


def _encoder_weight(model) -> torch.Tensor:
    return model.module.z_encoder.layers[0].fc_layers[0][0].weight.detach().clone()


def test_query_is_encoded_by_the_reference_encoder(tmp_path):
    """By default the query's batch starts as the reference's (one batch: no batch input)
    and the encoder stays frozen: the query's latent is the reference model's, before and
    after query training; only the decoder's query column trains."""
    model, query = _reference_and_query(1)
    as_reference = query.copy()
    as_reference.obs["batch"] = "ref0"
    expected = model.get_latent_representation(as_reference)
    model.save(tmp_path / "ref")
    for reference in (model, tmp_path / "ref"):  # a model, or its folder
        query_model = SCALE.load_query_data(query.copy(), reference)
        query_model.is_trained_ = True  # mapped, not trained yet
        np.testing.assert_allclose(query_model.get_latent_representation(), expected, atol=1e-5)
    encoder = _encoder_weight(query_model)
    key = "decoder.output.fc_layers.Layer 0.0.weight"
    decoder = query_model.module.state_dict()[key].clone()
    query_model.train(max_epochs=3, enable_progress_bar=False)
    torch.testing.assert_close(_encoder_weight(query_model), encoder, rtol=0, atol=0)
    assert not torch.equal(query_model.module.state_dict()[key][:, -1], decoder[:, -1])
    np.testing.assert_allclose(query_model.get_latent_representation(), expected, atol=1e-5)


def test_query_batch_starts_at_the_reference_batches_mean():
    model, query = _reference_and_query(2)
    reference_columns = _encoder_weight(model)[:, -2:]
    query_model = SCALE.load_query_data(query, model)
    weight = _encoder_weight(query_model)
    torch.testing.assert_close(weight[:, -3:-1], reference_columns, rtol=0, atol=0)
    torch.testing.assert_close(weight[:, -1], reference_columns.mean(1), rtol=1e-6, atol=1e-7)


def test_adapt_encoder_trains_the_query_batch_columns():
    model, query = _reference_and_query(2)
    query_model = SCALE.load_query_data(query, model, adapt_encoder=True)
    before = _encoder_weight(query_model)
    query_model.train(max_epochs=3, enable_progress_bar=False)
    after = _encoder_weight(query_model)
    torch.testing.assert_close(after[:, :-1], before[:, :-1], rtol=0, atol=0)
    assert not torch.equal(after[:, -1], before[:, -1])


def test_multimodal_query_is_encoded_by_the_reference_encoders():
    from scale_scvi.data import simulate_multiome

    mdata = simulate_multiome(n_cells=160, n_peaks=300, n_genes=100, n_types=3, seed=0)
    mdata.obs["batch"] = np.where(np.arange(mdata.n_obs) % 2 == 0, "ref", "query")
    for mod in mdata.mod.values():
        mod.obs["batch"] = mdata.obs["batch"].to_numpy()
    reference = mdata[mdata.obs["batch"] == "ref"].copy()
    query = mdata[mdata.obs["batch"] == "query"].copy()
    modalities = {"atac_layer": "atac", "rna_layer": "rna", "batch_key": "atac"}
    SCALE.setup_mudata(reference, modalities=modalities, batch_key="batch")
    model = SCALE(reference, n_centroids=3, n_hidden=(16,))
    model.train(max_epochs=2, enable_progress_bar=False)
    query_model = SCALE.load_query_data(query, model)
    encoders = query_model.module.encoders
    before = {k: v.clone() for k, v in encoders.state_dict().items()}
    query_model.train(max_epochs=2, enable_progress_bar=False)
    for key, value in encoders.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert query_model.get_latent_representation().shape == (query.n_obs, 10)


def test_query_on_other_peaks_is_mapped_by_peak_name():
    """A query whose peaks come in another order, with peaks the reference lacks, is put on
    the reference's peaks by ``prepare_query_anndata``; its cells then get the latent the
    reference model gives the same cells (the encoder reads LSI coordinates here)."""
    model, _ = _reference_and_query(1)
    reference = model.adata
    query = reference.copy()
    query.obs["batch"] = "query"
    extra = ad.AnnData(
        sp.random(query.n_obs, 7, density=0.3, format="csr", random_state=0, dtype=np.float32),
        obs=query.obs.copy(),
    )
    extra.var_names = [f"extra{i}" for i in range(7)]
    query = ad.concat([query[:, ::-1], extra], axis=1, merge="first")
    query = SCALE.prepare_query_anndata(query, model, inplace=False)
    query_model = SCALE.load_query_data(query, model)
    query_model.is_trained_ = True
    assert query_model.module.n_lsi == 30
    np.testing.assert_allclose(
        query_model.get_latent_representation(),
        model.get_latent_representation(reference),
        atol=1e-5,
    )
