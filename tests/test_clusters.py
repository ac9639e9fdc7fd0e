"""Clusters without K: the mixture's number of components follows the data."""

import numpy as np
import pytest

from scale_scvi.train import fit_gmm


def _blobs(sizes=(60, 30, 20), seed=0, dim=2):
    rng = np.random.default_rng(seed)
    centers = np.arange(len(sizes)) * 6.0
    latent = np.concatenate(
        [rng.normal(c, 0.3, size=(n, dim)) for n, c in zip(sizes, centers, strict=True)]
    )
    return latent, np.repeat(np.arange(len(sizes)), sizes)


def test_leiden_finds_the_number_of_components():
    latent, _ = _blobs()
    weights, means, variances = fit_gmm(latent, 30, seed=0, method="leiden")
    assert weights.shape == (3,) and means.shape == (3, 2) and variances.shape == (3, 2)
    order = np.argsort(means[:, 0])
    np.testing.assert_allclose(weights[order], np.array([60, 30, 20]) / 110)
    np.testing.assert_allclose(means[order, 0], [0.0, 6.0, 12.0], atol=0.2)


def test_leiden_keeps_at_most_n_components():
    latent, _ = _blobs()
    weights, means, _ = fit_gmm(latent, 2, seed=0, method="leiden")
    assert weights.shape == (2,)
    np.testing.assert_allclose(weights.sum(), 1.0)


@pytest.mark.parametrize("method", ["kmeans", "leiden"])
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
