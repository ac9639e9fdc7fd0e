"""Plots of scale_scvi.pl (matplotlib's Agg backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scvi

from scale_scvi import SCALE, pl
from scale_scvi.data import simulate_scatac


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def trained():
    scvi.settings.seed = 0
    adata = simulate_scatac(n_cells=120, n_peaks=150, n_types=3, seed=2)
    SCALE.setup_anndata(adata)
    model = SCALE(adata, n_centroids=3, n_hidden=(16,))
    # by default a tenth of the cells is held out and validated after every epoch
    model.train(max_epochs=4, enable_progress_bar=False)
    assert len(model.validation_indices) == 12
    return model, adata


def test_training_curves_draw_the_history(trained, tmp_path):
    model, _ = trained
    axes = pl.training_curves(model, show=False, save=tmp_path / "curves.png")
    assert len(axes) == 3
    assert [ax.get_title() for ax in axes] == [
        "negative ELBO",
        "reconstruction loss",
        "KL divergence",
    ]
    train_line, validation_line = axes[0].get_lines()
    np.testing.assert_allclose(
        train_line.get_ydata(), model.history["elbo_train"].iloc[:, 0].astype(float)
    )
    np.testing.assert_allclose(
        validation_line.get_ydata(), model.history["elbo_validation"].iloc[:, 0].astype(float)
    )
    assert len(train_line.get_xdata()) == 4
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_training_curves_take_a_history_dict_and_given_axes(trained):
    model, _ = trained
    _, given = plt.subplots(1, 1)
    axes = pl.training_curves(model.history, metrics=["kl_local"], axes=[given], show=False)
    assert axes[0] is given
    np.testing.assert_allclose(
        given.get_lines()[0].get_ydata(), model.history["kl_local_train"].iloc[:, 0].astype(float)
    )


@pytest.mark.parametrize(
    ("argument", "kwargs", "error", "message"),
    [
        ({}, {}, ValueError, "empty"),
        ("history", {}, TypeError, "trained model"),
        (None, {"metrics": ["accuracy"]}, ValueError, "accuracy"),
    ],
)
def test_training_curves_bad_input(trained, argument, kwargs, error, message):
    model, _ = trained
    with pytest.raises(error, match=message):
        pl.training_curves(model if argument is None else argument, show=False, **kwargs)


def test_cluster_probabilities_heatmap_is_sorted_by_cluster():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=60)
    probs = np.full((60, 5), 0.02)
    probs[np.arange(60), labels] = 0.92  # components 3 and 4 are never the argmax
    ax = pl.cluster_probabilities(probs, show=False)
    image = ax.get_images()[0].get_array()
    assert image.shape == (60, 3)  # unused components dropped
    shown = [int(t.get_text()) for t in ax.get_xticklabels()]
    counts = np.bincount(labels, minlength=5)
    assert shown == sorted(range(3), key=lambda c: -counts[c])
    # Cells come in blocks, one per column, largest cluster first.
    assert (np.diff(np.asarray(image).argmax(1)) >= 0).all()
    full = pl.cluster_probabilities(probs, drop_unused=False, show=False)
    assert full.get_images()[0].get_array().shape == (60, 5)


def test_cluster_probabilities_from_adata_grouped(trained):
    model, adata = trained
    adata.obsm["scale_probabilities"] = model.get_cluster_probabilities()
    ax = pl.cluster_probabilities(adata, groupby="cell_type", show=False)
    image = np.asarray(ax.get_images()[0].get_array())
    assert image.shape[0] == adata.n_obs
    used = np.unique(adata.obsm["scale_probabilities"].argmax(1))
    assert image.shape[1] == len(used)
    strip = ax.child_axes[0]
    codes = np.asarray(strip.get_images()[0].get_array()).ravel()
    assert (np.diff(codes) >= 0).all()  # cells sorted by group
    assert [t.get_text() for t in strip.get_yticklabels()] == list(
        adata.obs["cell_type"].cat.categories
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"key": "missing"}, "obsm has no"),
        ({"groupby": "nope"}, "not a column"),
    ],
)
def test_cluster_probabilities_bad_input(trained, kwargs, message):
    _, adata = trained
    adata.obsm["scale_probabilities"] = np.full((adata.n_obs, 3), 1 / 3)
    with pytest.raises(ValueError, match=message):
        pl.cluster_probabilities(adata, show=False, **kwargs)
    with pytest.raises(ValueError, match="groupby needs an AnnData"):
        pl.cluster_probabilities(np.ones((4, 2)), groupby="x", show=False)


def _peak_table(adata, n_top=2):
    rows = []
    for c, peaks in enumerate([adata.var_names[:3], adata.var_names[3:6]]):
        for rank, peak in enumerate(peaks[:n_top], start=1):
            rows.append({"component": str(c), "peak": peak, "rank": rank})
    return pd.DataFrame(rows)


def test_cluster_specific_peaks_shows_fractions_of_open_cells(trained):
    _, adata = trained
    table = _peak_table(adata, n_top=3)
    ax = pl.cluster_specific_peaks(
        adata, table, groupby="cell_type", n_top=2, standard_scale=False, show=False
    )
    image = np.asarray(ax.get_images()[0].get_array())
    groups = adata.obs["cell_type"].cat.categories
    assert image.shape == (len(groups), 4)  # 2 components x top 2 peaks
    shown = list(adata.var_names[[0, 1, 3, 4]])
    for i, group in enumerate(groups):
        cells = (adata.obs["cell_type"] == group).to_numpy()
        expected = (adata[cells, shown].X.toarray() > 0).mean(0)
        np.testing.assert_allclose(image[i], expected)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1"]


def test_cluster_specific_peaks_scaled_and_from_a_layer(trained):
    _, adata = trained
    adata.layers["imputed"] = adata.X.multiply(0.5).tocsr()
    table = _peak_table(adata)
    kwargs = {"groupby": "cell_type", "layer": "imputed", "binarize": False, "show": False}
    raw = pl.cluster_specific_peaks(adata, table, standard_scale=False, **kwargs)
    raw = np.asarray(raw.get_images()[0].get_array())
    groups = adata.obs["cell_type"].cat.categories
    shown = list(adata.var_names[[0, 1, 3, 4]])
    for i, group in enumerate(groups):
        cells = (adata.obs["cell_type"] == group).to_numpy()
        np.testing.assert_allclose(raw[i], adata[cells, shown].layers["imputed"].mean(0).A1)
    scaled = pl.cluster_specific_peaks(adata, table, **kwargs)
    scaled = np.asarray(scaled.get_images()[0].get_array())
    span = raw.max(0) - raw.min(0)
    expected = (raw - raw.min(0)) / np.where(span > 0, span, 1.0)
    np.testing.assert_allclose(scaled, expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peaks": pd.DataFrame({"peak": ["a"]})}, "get_cluster_specific_peaks"),
        ({"groupby": "nope"}, "not a column"),
        ({"layer": "nope"}, "Layer"),
        ({"n_top": 0}, "n_top"),
        (
            {"peaks": pd.DataFrame({"component": ["0"], "peak": ["chrZ:1-2"], "rank": [1]})},
            "not in adata.var_names",
        ),
    ],
)
def test_cluster_specific_peaks_bad_input(trained, change, message):
    _, adata = trained
    kwargs = {"adata": adata, "peaks": _peak_table(adata), "groupby": "cell_type", **change}
    with pytest.raises(ValueError, match=message):
        pl.cluster_specific_peaks(show=False, **kwargs)
