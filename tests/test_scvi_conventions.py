"""A PeakVI user's calls, unchanged, on a SCALE model: differential accessibility on
scvi-tools' DE framework and imputation with PeakVI's arguments."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi

from scale_scvi import SCALE
from scale_scvi.data import simulate_scatac
from scale_scvi.model._differential import DA_COLUMNS

FEW = 600  # posterior samples per population (scvi-tools' default: 5,000)


@pytest.fixture(scope="module")
def trained():
    """Two batches of three simulated cell types, a model trained for a few epochs."""
    scvi.settings.seed = 0
    adata = simulate_scatac(
        n_cells=180, n_peaks=150, n_types=3, specific_fraction=0.15, density=(0.1, 0.3), seed=2
    )
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2 == 0, "b1", "b2")
    # all peaks (no selection), so that outputs line up with adata.var_names
    SCALE.setup_anndata(adata, batch_key="batch", min_fraction=None, n_top_peaks=None)
    model = SCALE(adata, n_centroids=3, n_hidden=(64,))
    model.train(max_epochs=30, enable_progress_bar=False)
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.codes.astype(str)
    return model, adata


def test_peakvi_tutorial_calls_run_unchanged(trained):
    """The DA and imputation cells of scvi-tools' PeakVI tutorial, with its column names."""
    model, adata = trained
    # "da_res11 = model.differential_accessibility(groupby=..., group1=...)": one vs the rest
    da_res11 = model.differential_accessibility(groupby="cell_type", group1="0")
    assert list(da_res11.columns[: len(DA_COLUMNS)]) == list(DA_COLUMNS)
    assert len(da_res11) == adata.n_vars
    assert da_res11["prob_da"].is_monotonic_decreasing
    top = da_res11.loc[da_res11.is_da_fdr].sort_values("prob_da", ascending=False)
    assert len(top) > 0
    # two groups
    da_res_0_1 = model.differential_accessibility(
        groupby="cell_type", group1="0", group2="1", n_samples_overall=FEW
    )
    assert set(da_res_0_1["comparison"]) == {"0 vs 1"}
    # imputation as a DataFrame with cell and peak names
    imputed = model.get_normalized_accessibility(return_numpy=False)
    assert isinstance(imputed, pd.DataFrame)
    assert list(imputed.index) == list(adata.obs_names)
    assert list(imputed.columns) == list(adata.var_names)
    sparse = model.get_normalized_accessibility(threshold=0.3, return_numpy=False)
    assert isinstance(sparse.dtypes.iloc[0], pd.SparseDtype)


def test_da_statistics_follow_the_imputation(trained):
    model, adata = trained
    da = model.differential_accessibility(
        groupby="cell_type", group1="0", group2="1", n_samples_overall=2000
    )
    imputed = model.get_normalized_accessibility()
    in1 = (adata.obs["cell_type"] == "0").to_numpy()
    in2 = (adata.obs["cell_type"] == "1").to_numpy()
    da = da.loc[adata.var_names]
    # est_prob: means of posterior samples; close to the mean imputation of the group
    np.testing.assert_allclose(da["est_prob1"], imputed[in1].mean(0), atol=0.05)
    np.testing.assert_allclose(da["est_prob2"], imputed[in2].mean(0), atol=0.05)
    np.testing.assert_allclose(da["effect_size"], da["est_prob2"] - da["est_prob1"])
    x = adata.X.toarray() > 0
    np.testing.assert_allclose(da["emp_prob1"], x[in1].mean(0), rtol=1e-6)
    np.testing.assert_allclose(da["emp_effect"], x[in2].mean(0) - x[in1].mean(0), atol=1e-6)
    # peaks called differential do differ in the data
    called = da["is_da_fdr"].to_numpy()
    assert called.sum() >= 10
    assert np.abs(da["emp_effect"][called]).mean() > 2 * np.abs(da["emp_effect"][~called]).mean()


def test_da_between_random_halves_of_one_type_finds_little(trained):
    model, adata = trained
    cells = np.flatnonzero((adata.obs["cell_type"] == "2").to_numpy())
    real = model.differential_accessibility(
        groupby="cell_type", group1="2", group2="1", n_samples_overall=FEW
    )
    null = model.differential_accessibility(
        idx1=cells[::2], idx2=cells[1::2], n_samples_overall=FEW
    )
    assert "comparison" not in null.columns  # idx1/idx2: no groups, as in scvi-tools
    assert null["is_da_fdr"].sum() < real["is_da_fdr"].sum() / 4
    assert null["prob_da"].mean() < real["prob_da"].mean()


def test_one_vs_rest_for_every_group_and_options(trained):
    model, _ = trained
    every = model.differential_accessibility(
        groupby="cell_type", silent=True, n_samples_overall=FEW
    )
    assert sorted(set(every["comparison"])) == [f"{g} vs Rest" for g in "012"]
    vanilla = model.differential_accessibility(
        groupby="cell_type", group1="0", mode="vanilla", all_stats=False, n_samples_overall=FEW
    )
    assert vanilla["is_da_fdr"].isna().all() and "emp_prob1" not in vanilla
    assert vanilla["prob_da"].between(0, 1).all()
    # the same posterior draws for both (same seed): |d| > delta holds wherever d > delta does
    scvi.settings.seed = 1
    one_sided = model.differential_accessibility(
        groupby="cell_type", group1="0", two_sided=False, n_samples_overall=FEW
    )
    scvi.settings.seed = 1
    two_sided = model.differential_accessibility(
        groupby="cell_type", group1="0", n_samples_overall=FEW
    )
    one_sided = one_sided.loc[two_sided.index]
    assert (one_sided["prob_da"] <= two_sided["prob_da"] + 1e-9).all()
    # one-sided: only peaks more open in group 1 (effect_size = p2 - p1 < 0) are called
    assert (one_sided.loc[one_sided["is_da_fdr"], "effect_size"] < 0).all()
    corrected = model.differential_accessibility(
        groupby="cell_type", group1="0", group2="1", batch_correction=True, n_samples_overall=FEW
    )
    assert corrected["prob_da"].between(0, 1).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"groupby": "kind", "group1": "0"}, ValueError, "not a column"),
        ({"groupby": "cell_type", "group1": "9"}, ValueError, "group1"),
        ({"groupby": "cell_type", "group1": "0", "group2": "9"}, ValueError, "group2"),
        ({"adata": "cell_type"}, TypeError, "adata first"),
    ],
)
def test_da_bad_arguments(trained, kwargs, error, message):
    model, _ = trained
    with pytest.raises(error, match=message):
        model.differential_accessibility(**kwargs)


def test_component_da(trained):
    model, adata = trained
    labels = model.get_cluster_assignments()
    c1, c2 = (int(c) for c in labels.categories[:2])
    table = model.differential_accessibility_components(c1, c2, n_samples=500)
    assert list(table.columns[: len(DA_COLUMNS)]) == list(DA_COLUMNS)
    assert len(table) == adata.n_vars
    # the observed open fractions of the assigned cells agree in sign with the estimate
    called = table[table["is_da_fdr"]]
    assert len(called) >= 5
    agree = np.sign(called["effect_size"]) == np.sign(called["emp_effect"])
    assert agree.mean() > 0.8
    rest = model.differential_accessibility_components(n_samples=200)
    assert set(rest["comparison"]) == {f"{c} vs Rest" for c in labels.categories}
    with pytest.raises(ValueError, match="out of range"):
        model.differential_accessibility_components(99)


def test_imputation_arguments(trained):
    model, adata = trained
    full = model.get_normalized_accessibility()
    regions = list(adata.var_names[[5, 1, 30]])
    sub = model.get_normalized_accessibility(region_list=regions, return_numpy=False)
    assert list(sub.columns) == [adata.var_names[i] for i in (1, 5, 30)]  # the model's order
    np.testing.assert_allclose(sub.to_numpy(), full[:, [1, 5, 30]], rtol=1e-6)
    b1 = model.get_normalized_accessibility(transform_batch="b1")
    b2 = model.get_normalized_accessibility(transform_batch="b2")
    is_b1 = (adata.obs["batch"] == "b1").to_numpy()
    np.testing.assert_allclose(b1[is_b1], full[is_b1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(b1, b2)
    both = model.get_normalized_accessibility(transform_batch=["b1", "b2"])
    np.testing.assert_allclose(both, (b1 + b2) / 2, rtol=1e-5, atol=1e-6)
    drawn = model.get_normalized_accessibility(n_samples_overall=17, return_numpy=False)
    assert drawn.shape == (17, adata.n_vars) and drawn.index.isin(adata.obs_names).all()
    own_depth = model.get_normalized_accessibility(normalize_cells=True)
    depth = np.asarray(adata.X.sum(1)).ravel()
    deep, shallow = depth > np.median(depth), depth < np.median(depth)
    assert (own_depth / full)[deep].mean() > (own_depth / full)[shallow].mean()
    csr = model.get_normalized_accessibility(threshold=0.5, region_list=regions)
    assert sp.issparse(csr) and csr.shape == (adata.n_obs, 3)
    with pytest.raises(ValueError, match="region factors"):
        model.get_normalized_accessibility(normalize_regions=True)
    with pytest.raises(ValueError, match="region_list"):
        model.get_normalized_accessibility(region_list=["nope"])
    with pytest.raises(ValueError, match="not a valid batch"):
        model.get_normalized_accessibility(transform_batch="b9")


def test_cluster_assignments_take_the_probabilities_arguments(trained):
    model, _ = trained
    idx = np.arange(5, 25)
    labels = model.get_cluster_assignments(indices=idx, batch_size=7, modality="joint")
    np.testing.assert_array_equal(
        labels.astype(int), model.get_cluster_probabilities(indices=idx).argmax(1)
    )
    with pytest.raises(ValueError, match="modality"):
        model.get_cluster_assignments(modality="rna")


def test_da_matrixplot_of_the_top_peaks(trained):
    import matplotlib

    matplotlib.use("Agg")
    from scale_scvi import pl

    model, adata = trained
    da = model.differential_accessibility(groupby="cell_type", n_samples_overall=FEW)
    top = pl.top_da_peaks(da, n_top=3)
    assert list(top) == ["0", "1", "2"] and all(len(p) == 3 for p in top.values())
    for group, peaks in top.items():
        rows = da[(da["group1"] == group)].loc[peaks]
        assert (rows["effect_size"] < 0).all()
    axes = pl.differential_accessibility(adata, da, groupby="cell_type", n_top=3, show=False)
    assert "mainplot_ax" in axes
    labels = [t.get_text() for t in axes["mainplot_ax"].get_xticklabels()]
    assert labels == [p for peaks in top.values() for p in peaks]
    with pytest.raises(ValueError, match="group1"):
        pl.differential_accessibility(adata, da.drop(columns="group1"), groupby="cell_type")
