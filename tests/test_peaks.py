"""Cluster-specific peaks: decoded component means."""

from __future__ import annotations

import numpy as np
import pytest
import scvi
import torch
from sklearn.cluster import KMeans

from scale_scvi import SCALE
from scale_scvi.data import simulate_scatac
from scale_scvi.model._peaks import rank_specific_peaks

N_TYPES = 4
BLOCK = 20  # peaks 20*c .. 20*c+19 are made specific to component c


@pytest.fixture(scope="module")
def planted():
    """A linear-decoder model whose components open known blocks of peaks.

    The prior means are put at k-means centres of the (untrained) posterior means, and the
    decoder is solved so that decoding centre ``c`` gives eta = +4 on block ``c`` and -3
    elsewhere (the linear predictor of the model's link): the answer of every method below
    is known.
    """
    scvi.settings.seed = 0
    adata = simulate_scatac(n_cells=120, n_peaks=200, n_types=N_TYPES, seed=3)
    SCALE.setup_anndata(adata, min_fraction=None, n_top_peaks=None)
    model = SCALE(adata, n_centroids=N_TYPES, n_hidden=(32,))
    model.is_trained_ = True
    model.module.eval()  # as training leaves it (batch norm on its running statistics)
    z = model.get_latent_representation()
    km = KMeans(N_TYPES, n_init=10, random_state=0).fit(z)
    centres = km.cluster_centers_
    model.module.prior.set_parameters(
        torch.full((N_TYPES,), 1.0 / N_TYPES),
        torch.as_tensor(centres, dtype=torch.float32),
        torch.full(centres.shape, float(z.var(0).mean()) * 0.05),
    )
    target = np.full((N_TYPES, adata.n_vars), -3.0)
    for c in range(N_TYPES):
        target[c, c * BLOCK : (c + 1) * BLOCK] = 4.0
    # eta = centres @ W.T + b with b = 0: least squares for W (exact: K <= D).
    weight = np.linalg.lstsq(centres, target, rcond=None)[0].T
    linear = model.module.decoder.output.fc_layers[0][0]
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        linear.bias.zero_()
    adata.obs["scale_cluster"] = model.get_cluster_assignments()
    return model, adata, km.labels_


def test_components_decode_to_their_planted_blocks(planted):
    model, adata, _ = planted
    table = model.get_cluster_specific_peaks(n_top=BLOCK, components=range(N_TYPES))
    assert list(table.columns) == [
        "component",
        "peak",
        "rank",
        "p_component",
        "p_rest",
        "score",
        "log2_fold_change",
    ]
    assert len(table) == N_TYPES * BLOCK
    for c in range(N_TYPES):
        rows = table[table["component"] == str(c)]
        expected = set(adata.var_names[c * BLOCK : (c + 1) * BLOCK])
        assert set(rows["peak"]) == expected
        assert rows["rank"].tolist() == list(range(1, BLOCK + 1))
        p_in, p_out = model.module.open_probability(torch.tensor([4.0, -3.0])).tolist()
        np.testing.assert_allclose(rows["p_component"], p_in, rtol=1e-4)
        np.testing.assert_allclose(rows["p_rest"], p_out, rtol=1e-4)
    assert (table["score"] > 0.9).all()


def test_default_components_are_the_clusters_in_use(planted):
    model, adata, kmeans_labels = planted
    # Equal weights and variances: the most probable component is the nearest centre.
    assert (adata.obs["scale_cluster"].astype(int).to_numpy() == kmeans_labels).all()
    table = model.get_cluster_specific_peaks(n_top=3)
    assert set(table["component"]) == set(adata.obs["scale_cluster"].cat.categories)


def test_rest_max_is_stricter_than_mean():
    # Peak "a" is open in components 0 and 1, peak "b" in component 0 alone.
    probs = np.array([[0.9, 0.5], [0.9, 0.1], [0.0, 0.1]])
    mean = rank_specific_peaks(probs, [0, 1, 2], ["a", "b"], n_top=None, rest="mean")
    strict = rank_specific_peaks(probs, [0, 1, 2], ["a", "b"], n_top=None, rest="max")
    first = mean[mean["component"] == "0"].set_index("peak")
    assert first.loc["a", "score"] == pytest.approx(0.9 - 0.45)
    assert first.loc["b", "score"] == pytest.approx(0.5 - 0.1)
    assert first.index[0] == "a"
    first_strict = strict[strict["component"] == "0"].set_index("peak")
    assert first_strict.loc["a", "score"] == pytest.approx(0.0)
    assert first_strict.index[0] == "b"
    assert first_strict.loc["b", "log2_fold_change"] == pytest.approx(np.log2(5.0), rel=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_top": 0}, "n_top"),
        ({"rest": "median", "components": [0, 1]}, "rest"),
        ({"components": [0, 9]}, "out of range"),
        ({"components": [1]}, "at least two components"),
        ({"components": [0, 1], "batch": "nope"}, "batch"),
    ],
)
def test_cluster_specific_peaks_bad_arguments(planted, kwargs, message):
    model, _, _ = planted
    kwargs.setdefault("components", [0, 1])
    with pytest.raises(ValueError, match=message):
        model.get_cluster_specific_peaks(**kwargs)


def test_untrained_model_is_refused():
    adata = simulate_scatac(n_cells=40, n_peaks=50, n_types=2, seed=0)
    SCALE.setup_anndata(adata)
    model = SCALE(adata, n_centroids=2, n_hidden=(8,))
    with pytest.raises(RuntimeError, match="train"):
        model.get_cluster_specific_peaks()


def test_multimodal_model_ranks_the_atac_peaks():
    from scale_scvi.data import simulate_multiome

    mdata = simulate_multiome(n_cells=120, n_peaks=150, n_genes=80, n_types=3, seed=0)
    SCALE.setup_mudata(mdata)
    model = SCALE(mdata, n_centroids=3, n_hidden=(16,))
    model.train(max_epochs=2, enable_progress_bar=False)
    components = list(range(model.n_clusters_))
    assert len(components) >= 2
    table = model.get_cluster_specific_peaks(n_top=None, components=components)
    atac_peaks = mdata.mod["atac"].var_names
    for c in components:
        assert sorted(table.loc[table["component"] == str(c), "peak"]) == sorted(atac_peaks)
    group = mdata.obs["cell_type"].astype(str).iloc[0]
    diff = model.differential_accessibility(
        groupby="cell_type", group1=group, n_samples_overall=200
    )
    assert sorted(diff.index) == sorted(atac_peaks)
    assert diff["emp_prob1"].between(0, 1).all()
