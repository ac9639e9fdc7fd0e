"""Reference/query mapping (scArches) keeps the reference's Gaussian-mixture prior."""

from __future__ import annotations

import numpy as np
import pytest
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
