"""Reference/query mapping (scArches) keeps the reference's Gaussian-mixture prior."""

from __future__ import annotations

import numpy as np
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
    weights_before = query_model.module.decoder.output.fc_layers[0][0].weight.detach().clone()
    query_model.train(max_epochs=3, plan_kwargs={"weight_decay": 0.0}, enable_progress_bar=False)
    for key, value in query_model.module.prior.state_dict().items():
        torch.testing.assert_close(value, prior[key], rtol=0, atol=0)
    # The query's own batch column of the decoder did train.
    weights_after = query_model.module.decoder.output.fc_layers[0][0].weight.detach()
    assert not torch.equal(weights_before[:, -1], weights_after[:, -1])
    probs = query_model.get_cluster_probabilities()
    # the reference's clusters (its components left on after training)
    assert query_model.n_clusters_ == model.n_clusters_
    assert probs.shape == (query.n_obs, model.n_clusters_)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
