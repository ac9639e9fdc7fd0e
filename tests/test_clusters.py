"""Clusters without K: the mixture's number of components follows the data."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_rand_score

from scale_scvi import SCALE
from scale_scvi.data import simulate_scatac
from scale_scvi.module._components import select_columns
from scale_scvi.train import fit_gmm
from scale_scvi.train._gmm_init import (
    REFIT_RESOLUTION,
    REFIT_TRIM,
    knn_connectivities,
    leiden_partition,
    merge_partition,
    merge_value,
)

SMALL = {"n_hidden": (64, 32)}


def _blobs(sizes=(60, 30, 20), seed=0, dim=10):
    rng = np.random.default_rng(seed)
    centers = np.arange(len(sizes)) * 6.0
    latent = np.concatenate(
        [rng.normal(c, 0.3, size=(n, dim)) for n, c in zip(sizes, centers, strict=True)]
    )
    return latent, np.repeat(np.arange(len(sizes)), sizes)


def test_leiden_finds_the_number_of_components():
    latent, _ = _blobs()
    weights, means, variances = fit_gmm(latent, 30, seed=0, method="leiden")
    assert weights.shape == (3,) and means.shape == (3, 10) and variances.shape == (3, 10)
    order = np.argsort(means[:, 0])
    np.testing.assert_allclose(weights[order], np.array([60, 30, 20]) / 110)
    np.testing.assert_allclose(means[order, 0], [0.0, 6.0, 12.0], atol=0.2)


def test_leiden_keeps_at_most_n_components():
    latent, _ = _blobs()
    weights, means, _ = fit_gmm(latent, 2, seed=0, method="leiden")
    assert weights.shape == (2,)
    np.testing.assert_allclose(weights.sum(), 1.0)


@pytest.mark.parametrize("method", ["kmeans"])
def test_rows_weighted_by_one_over_their_cells_rows(method):
    """A cell with two rows (paired, two experts) at weight 1/2 counts as one cell."""
    latent, _ = _blobs(sizes=(40, 20, 20))
    posterior_var = np.full_like(latent, 0.1)
    once = fit_gmm(latent, 3, seed=0, method=method, posterior_var=posterior_var)
    # the first blob's cells appear twice, with weight 1/2 each
    doubled = np.concatenate([latent, latent[:40]])
    weight = np.r_[np.full(40, 0.5), np.ones(40), np.full(40, 0.5)]
    twice = fit_gmm(
        doubled,
        3,
        seed=0,
        method=method,
        posterior_var=np.full_like(doubled, 0.1),
        sample_weight=weight,
    )
    order_once, order_twice = np.argsort(once[1][:, 0]), np.argsort(twice[1][:, 0])
    for a, b in zip(once, twice, strict=True):
        np.testing.assert_allclose(a[order_once], b[order_twice], rtol=1e-6, atol=1e-8)
    unweighted = fit_gmm(doubled, 3, seed=0, method=method)
    assert not np.allclose(np.sort(unweighted[0]), np.sort(once[0]))


def test_sample_weight_is_checked():
    with pytest.raises(ValueError, match="one positive weight per row"):
        fit_gmm(np.zeros((10, 2)), 2, sample_weight=np.ones(9))


def test_merge_joins_the_pieces_of_one_gaussian_and_keeps_separate_ones():
    rng = np.random.default_rng(1)
    one = rng.normal(0, 1, size=(400, 10))
    pieces = (one[:, 0] > 0).astype(int) + 2 * (one[:, 1] > 0)  # four quadrants of a blob
    assert len(np.unique(merge_partition(one, pieces))) == 1
    shift = np.r_[8.0, np.zeros(9)]
    two = np.concatenate([one, rng.normal(0, 1, size=(30, 10)) + shift])
    labels = np.r_[pieces, np.full(30, 4)]
    merged = merge_partition(two, labels)
    assert len(np.unique(merged)) == 2
    assert (merged[-30:] == merged[-1]).all() and merged[-1] != merged[0]


def test_merge_joins_the_halves_of_a_large_non_gaussian_population():
    """The integrated completed likelihood: the halves of a uniform box overlap as Gaussians,
    and are merged at 5,000 cells, where the price of the extra parameters alone (which
    grows as log n) is below the likelihood gain of two Gaussians over one for a box; two
    Gaussian populations 6 standard deviations apart (assignments of almost no entropy)
    stay apart."""
    rng = np.random.default_rng(0)
    box = rng.uniform(-1, 1, size=(5000, 10))
    halves = (box[:, 0] > 0).astype(int)
    assert len(np.unique(merge_partition(box, halves))) == 1
    assert len(np.unique(merge_partition(box, halves, criterion="bic"))) == 2
    with pytest.raises(ValueError, match="criterion must be 'icl' or 'bic'"):
        merge_partition(box, halves, criterion="aic")
    x = rng.normal(size=(10000, 10))
    x[5000:, 0] += 6.0
    labels = np.repeat([0, 1], 5000)
    merged = merge_partition(x, labels)
    assert len(np.unique(merged)) == 2
    assert (merged[:5000] == merged[0]).all() and (merged[5000:] == merged[-1]).all()


def test_merge_value_is_the_pair_criterion_of_the_merge():
    """Positive exactly when merge_partition joins two clusters: the box's halves under the
    ICL, not under the BIC."""
    rng = np.random.default_rng(0)
    box = rng.uniform(-1, 1, size=(5000, 10))
    left = box[:, 0] > 0
    weight = np.ones(len(box))
    assert merge_value(box, weight, left, ~left) > 0
    assert merge_value(box, weight, left, ~left, criterion="bic") < 0


def test_knn_connectivities_are_symmetric_fuzzy_weights():
    latent, _ = _blobs(sizes=(50, 50))
    graph = knn_connectivities(latent, n_neighbors=15)
    assert (abs(graph - graph.T) > 1e-12).nnz == 0
    assert graph.diagonal().max() == 0
    assert graph.data.min() > 0 and graph.data.max() <= 1 + 1e-12
    # every cell's nearest other cell is connected with weight 1
    assert np.allclose(graph.max(1).toarray().ravel(), 1.0)
    labels = leiden_partition(latent, 30)
    assert len(np.unique(labels)) >= 2


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_select_columns(layout):
    x = torch.tensor([[0.0, 2.0, 0.0, 1.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 4.0]])
    index = torch.tensor([1, 3])
    xin = x if layout == "dense" else x.to_sparse_csr()
    out = select_columns(xin, index)
    assert out.layout == xin.layout
    dense = out if layout == "dense" else out.to_dense()
    torch.testing.assert_close(dense, x[:, [1, 3]])


@pytest.fixture(scope="module")
def four_types():
    scvi_seed()
    adata = simulate_scatac(n_cells=240, n_peaks=400, n_types=4, seed=3)
    # The peaks open in 1 % of the cells, without the floor of the 10,000 most open ones
    # (which would read every peak of this small set): on fewer peaks the types overlap a
    # little, so that the clusters' probabilities are not all 0 or 1 (tested below).
    SCALE.setup_anndata(adata, n_min_peaks=None)
    model = SCALE(adata, **SMALL)
    model.train(max_epochs=40, enable_progress_bar=False)
    return adata, model


def scvi_seed():
    import scvi

    scvi.settings.seed = 0


def test_without_k_the_data_choose_the_clusters(four_types):
    adata, model = four_types
    assert model.module.prior.n_components == 30
    assert 2 <= model.n_clusters_ < 30
    labels = model.get_cluster_assignments()
    # contiguous labels 0 .. n_clusters_ - 1, every cluster used by the training cells
    assert list(labels.categories) == [str(i) for i in range(model.n_clusters_)]
    assert set(labels.astype(str)) == set(labels.categories)
    probs = model.get_cluster_probabilities()
    assert probs.shape == (adata.n_obs, model.n_clusters_)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(probs.argmax(1).astype(str), np.asarray(labels))
    assert adjusted_rand_score(adata.obs["cell_type"], labels) > 0.5


def test_confidence_and_sampled_probabilities(four_types):
    adata, model = four_types
    table = model.get_cluster_assignments(return_confidence=True)
    assert list(table.columns) == ["cluster", "confidence", "entropy"]
    assert (table.index == adata.obs_names).all()
    probs = model.get_cluster_probabilities()
    np.testing.assert_allclose(table["confidence"], probs.max(1), rtol=1e-6)
    assert ((table["entropy"] >= 0) & (table["entropy"] <= np.log(model.n_clusters_) + 1e-6)).all()
    sampled = model.get_cluster_probabilities(n_samples=20)
    assert sampled.shape == probs.shape
    np.testing.assert_allclose(sampled.sum(1), 1.0, rtol=1e-5)
    # the average over draws of q(z|x) is not p(c | posterior mean) ...
    assert np.abs(sampled - probs).max() > 1e-5
    # ... and it converges: two averages over many draws agree to Monte-Carlo error
    many = [model.get_cluster_probabilities(n_samples=400) for _ in range(2)]
    assert np.abs(many[0] - many[1]).max() < 0.1
    assert np.abs(many[0] - many[1]).max() < np.abs(many[0] - probs).max()
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        model.get_cluster_probabilities(n_samples=0)


def test_mixture_is_fitted_again_on_the_trained_latent(four_types):
    adata, model = four_types
    # the final fit is made on the training cells (a tenth is held out by default), with
    # the components' moments trimmed and Leiden at the final fit's resolution
    means, variances, _ = model._posterior_moments(adata, model.train_indices, 128)
    weights, centers, _ = fit_gmm(
        means,
        30,
        seed=0,
        posterior_var=variances,
        method="leiden",
        trim=REFIT_TRIM,
        resolution=REFIT_RESOLUTION,
    )
    prior = model.module.prior
    active = prior.active.cpu().numpy()
    # the components left on are those of a fit on the final posterior means (the ones no
    # cell chose as its most probable are switched off afterwards)
    assert active[: len(weights)].sum() == active.sum() == model.n_clusters_
    kept = active[: len(weights)]
    np.testing.assert_allclose(
        prior.means.detach().cpu().numpy()[: len(weights)][kept], centers[kept], atol=1e-5
    )


@pytest.mark.parametrize(
    ("gmm_refit", "expected"),
    [
        (
            True,
            [("start of epoch 1", None, None), ("end of training", REFIT_TRIM, REFIT_RESOLUTION)],
        ),
        (False, [("start of epoch 1", None, None)]),
    ],
)
def test_gmm_refit_fits_the_mixture_again_when_training_ends(monkeypatch, gmm_refit, expected):
    from scale_scvi.train._gmm_init import GMMInitCallback

    calls = []
    fit = GMMInitCallback._fit

    def recording(self, trainer, module, when, trim=None, resolution=None):
        calls.append((when, trim, resolution))
        return fit(self, trainer, module, when, trim, resolution)

    monkeypatch.setattr(GMMInitCallback, "_fit", recording)
    scvi_seed()
    adata = simulate_scatac(n_cells=120, n_peaks=200, n_types=3, seed=4)
    SCALE.setup_anndata(adata)
    model = SCALE(adata, **SMALL)
    model.train(max_epochs=3, gmm_init_epoch=1, gmm_refit=gmm_refit, enable_progress_bar=False)
    assert calls == expected


def test_final_fit_reads_leiden_at_its_own_resolution(monkeypatch):
    # the warm-up's fit reads Leiden at the callback's resolution (1), the final fit at
    # REFIT_RESOLUTION: both reach fit_gmm
    from scale_scvi.train import _gmm_init

    resolutions = []
    fit = _gmm_init.fit_gmm

    def recording(*args, **kwargs):
        resolutions.append((kwargs["method"], kwargs["resolution"]))
        return fit(*args, **kwargs)

    monkeypatch.setattr(_gmm_init, "fit_gmm", recording)
    scvi_seed()
    adata = simulate_scatac(n_cells=120, n_peaks=200, n_types=3, seed=4)
    SCALE.setup_anndata(adata)
    model = SCALE(adata, **SMALL)
    model.train(max_epochs=3, gmm_init_epoch=1, enable_progress_bar=False)
    assert REFIT_RESOLUTION < 1.0
    assert resolutions == [("leiden", 1.0), ("leiden", REFIT_RESOLUTION)]


def test_explicit_k_is_kept_and_unused_components_are_pruned():
    scvi_seed()
    adata = simulate_scatac(n_cells=120, n_peaks=200, n_types=3, seed=4)
    SCALE.setup_anndata(adata)
    model = SCALE(adata, n_centroids=3, **SMALL)
    model.train(max_epochs=6, enable_progress_bar=False)
    assert model.module.prior.n_components == 3
    assert 1 <= model.n_clusters_ <= 3
    labels = model.get_cluster_assignments()
    assert list(labels.categories) == [str(i) for i in range(model.n_clusters_)]


def test_peak_selection_is_recorded_and_applied_again(tmp_path):
    scvi_seed()
    adata = simulate_scatac(n_cells=100, n_peaks=150, n_types=2, seed=5)
    counts = np.asarray((adata.X > 0).sum(0)).ravel()
    SCALE.setup_anndata(adata, min_cells=3, min_fraction=None, n_top_peaks=40)
    model = SCALE(adata, n_centroids=2, **SMALL)
    assert (counts >= 3).sum() > 40
    expected = np.sort(np.argsort(-np.where(counts >= 3, counts, -1), kind="stable")[:40])
    np.testing.assert_array_equal(model.module.peak_index.numpy(), expected)
    assert list(model.selected_peaks_) == list(adata.var_names[expected])
    model.train(max_epochs=2, enable_progress_bar=False)
    imputed = model.get_normalized_accessibility()
    assert imputed.shape == (adata.n_obs, 40)
    z = model.get_latent_representation()
    # only the selected peaks are read: changing the others changes nothing
    other = adata.copy()
    X = other.X.toarray()
    rest = np.setdiff1d(np.arange(adata.n_vars), expected)
    X[:, rest] = 1.0 - (X[:, rest] > 0)
    other.X = sp.csr_matrix(X)
    np.testing.assert_allclose(model.get_latent_representation(other), z, rtol=1e-5, atol=1e-6)
    # saved with the model, and applied again on load to new data (counted anew it would differ)
    model.save(tmp_path / "m", save_anndata=False)
    loaded = SCALE.load(tmp_path / "m", adata=other)
    np.testing.assert_array_equal(loaded.module.peak_index.numpy(), expected)
    np.testing.assert_allclose(loaded.get_latent_representation(other), z, rtol=1e-5, atol=1e-6)
    assert loaded.n_clusters_ == model.n_clusters_


def test_default_selection_reads_the_most_open_peaks_of_shallow_data():
    """Where fewer than 10,000 peaks reach 1 % of the cells, the 10,000 most open are read.

    5,000 cells with about 24 open peaks each of 12,000, each peak open in about 10 cells
    (0.2 %): the 1 % rule alone (50 cells) would read next to none of them.
    """
    rng = np.random.default_rng(0)
    X = sp.random(5_000, 12_000, density=0.002, format="csr", random_state=rng)
    X.data[:] = 1.0
    adata = ad.AnnData(X.astype(np.float32))
    adata.var_names = [f"peak_{i}" for i in range(adata.n_vars)]
    counts = np.asarray((X > 0).sum(0)).ravel()
    assert (counts >= 50).sum() < 10
    SCALE.setup_anndata(adata)
    model = SCALE(adata, **SMALL)
    nth = np.sort(counts)[::-1][10_000 - 1]
    expected = np.flatnonzero(counts >= nth)
    assert len(expected) >= 10_000
    assert list(model.selected_peaks_) == list(adata.var_names[expected])
    # Where enough peaks reach 1 %, the floor changes nothing.
    dense = ad.AnnData(
        sp.random(300, 11_000, density=0.05, format="csr", random_state=rng, dtype=np.float32)
    )
    dense.var_names = [f"peak_{i}" for i in range(dense.n_vars)]
    SCALE.setup_anndata(dense)
    reach = np.flatnonzero(np.asarray((dense.X > 0).sum(0)).ravel() >= 3)
    assert len(reach) > 10_000
    assert list(SCALE(dense, **SMALL).selected_peaks_) == list(dense.var_names[reach])


def test_default_selection_reads_the_peaks_that_hold_60_percent_of_the_open_entries():
    """Where the peaks open in 1 % of the cells hold less than ``MIN_OPEN_SHARE`` (60 %) of
    the matrix's open entries (shallow data), the most open peaks that hold it are read;
    ``min_open_share=None`` reads the 1 % ones.

    400 cells: 10,500 peaks open in about 16 cells each, 150,000 in about 1.6; the 1 % rule
    (4 cells) keeps the first and a thirteenth of the others, about 54 % of the entries.
    """
    from scale_scvi.model._peak_selection import MIN_OPEN_SHARE

    assert MIN_OPEN_SHARE == 0.6
    rng = np.random.default_rng(2)
    common = sp.random(400, 10_500, density=0.04, format="csc", random_state=rng)
    rare = sp.random(400, 150_000, density=0.004, format="csc", random_state=rng)
    X = sp.hstack([common, rare]).tocsr().astype(np.float32)
    X.data[:] = 1.0
    adata = ad.AnnData(X)
    adata.var_names = [f"peak_{i}" for i in range(adata.n_vars)]
    counts = np.asarray((X > 0).sum(0)).ravel()
    total = counts.sum()
    reach = counts >= 4
    assert reach.sum() > 10_000 and counts[reach].sum() < 0.6 * total
    held = np.sort(counts)[::-1]
    last = held[np.searchsorted(np.cumsum(held), 0.6 * total)]
    expected = np.flatnonzero(counts >= last)
    assert reach.sum() < len(expected) <= 50_000
    assert counts[expected].sum() >= 0.6 * total
    SCALE.setup_anndata(adata)
    assert list(SCALE(adata, **SMALL).selected_peaks_) == list(adata.var_names[expected])
    SCALE.setup_anndata(adata, min_open_share=None)
    selected = SCALE(adata, **SMALL).selected_peaks_
    assert list(selected) == list(adata.var_names[reach])


def test_every_peak_when_asked():
    adata = simulate_scatac(n_cells=60, n_peaks=80, n_types=2, seed=6)
    SCALE.setup_anndata(adata, min_fraction=None, n_top_peaks=None)
    model = SCALE(adata, n_centroids=2, **SMALL)
    assert model.module.peak_index is None
    assert len(model.selected_peaks_) == 80


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"min_fraction": 1.5}, ValueError, "min_fraction must be between 0 and 1"),
        ({"n_top_peaks": 0}, ValueError, "n_top_peaks must be >= 1"),
        ({"n_min_peaks": 0}, ValueError, "n_min_peaks must be >= 1"),
        ({"min_open_share": 1.5}, ValueError, "min_open_share must be between 0 and 1"),
        ({"min_open_share": True}, TypeError, "min_open_share must be a number"),
        ({"min_cells": 2.5}, TypeError, "min_cells must be an integer"),
        ({"min_cells": 10_000}, ValueError, "No peak is open in at least 10000 cells"),
    ],
)
def test_bad_selection_arguments(kwargs, error, match):
    adata = simulate_scatac(n_cells=40, n_peaks=50, n_types=2, seed=7)
    with pytest.raises(error, match=match):
        SCALE.setup_anndata(adata, **kwargs)


def test_row_weights_reach_the_mixture_of_a_multimodal_model():
    """A cell with C rows in the aggregate posterior (its experts) has C rows of weight 1/C."""
    from scale_scvi.data import simulate_multiome

    mdata = simulate_multiome(n_cells=40, n_genes=30, n_peaks=40, n_types=2, seed=0)
    SCALE.setup_mudata(mdata)
    model = SCALE(mdata, n_centroids=2, **SMALL)
    means, _, weights = model._posterior_moments(mdata, None, 16)
    assert weights.shape[0] == means.shape[0] > mdata.n_obs
    np.testing.assert_allclose(weights.sum(), mdata.n_obs, rtol=1e-6)
    assert set(np.round(1 / weights).astype(int)) <= {1, 2, 3}


def test_trimmed_moments_are_unbiased_for_a_gaussian_cluster():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(20_000, 10)) * 0.5 + 1.0
    _, means, plain = fit_gmm(latent, 1, seed=0)
    _, trimmed_means, trimmed = fit_gmm(latent, 1, seed=0, trim=REFIT_TRIM)
    # the consistency factor makes the central 80 % estimate the whole Gaussian's variance
    np.testing.assert_allclose(trimmed, plain, rtol=0.03)
    np.testing.assert_allclose(trimmed_means, means, atol=0.02)


def test_trimmed_moments_keep_a_few_outlying_cells_from_flattening_a_component():
    from scale_scvi.module import GaussianMixturePrior
    from scale_scvi.train._gmm_init import _partition_mixture, _trimmed_moments

    rng = np.random.default_rng(1)
    n_dim = 10
    shift = np.r_[1.5, np.zeros(n_dim - 1)]
    tight = rng.normal(size=(300, n_dim)) * 0.3
    core = rng.normal(size=(150, n_dim)) * 0.3 + shift
    stray = rng.normal(size=(10, n_dim)) * 6.0 + shift  # cells of the same cluster, far out
    latent = np.vstack([tight, core, stray])
    labels = np.r_[np.zeros(300, int), np.ones(160, int)]
    weight = np.ones(len(latent))
    weights, means, variances = _partition_mixture(latent, labels, 2, weight)
    trimmed = _trimmed_moments(latent, labels, weight, means, variances, REFIT_TRIM)
    assert variances[1].mean() > 1.0  # ten cells of 160 make the plain variance 25 times wider
    np.testing.assert_allclose(trimmed[1].mean(), 0.09, rtol=0.25)

    def core_kept(mu, var):
        prior = GaussianMixturePrior(2, n_dim)
        prior.set_parameters(*(torch.as_tensor(p) for p in (weights, mu, var + 1e-4)))
        with torch.inference_mode():
            best = prior.responsibilities(torch.as_tensor(core, dtype=torch.float32)).argmax(1)
        return float((best == 1).float().mean())

    # with the plain moments the tight neighbour takes part of the cluster's own core
    assert core_kept(means, variances) < 0.9
    assert core_kept(*trimmed) == 1.0


@pytest.mark.parametrize("trim", [0.0, 1.5, -0.2])
def test_trim_is_checked(trim):
    with pytest.raises(ValueError, match="trim must be in"):
        fit_gmm(np.zeros((10, 2)), 2, trim=trim)
