"""Model folders: no code run from a model file, no model lost to a failed save, no data
paired with the wrong model, and every method refuses data on other peaks."""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
import torch

from scale_scvi import SCALE
from scale_scvi.data import simulate_multiome, simulate_scatac
from scale_scvi.model import _io

from .conftest import not_canonical


def _train(seed: int, n_peaks: int = 40) -> SCALE:
    scvi.settings.seed = 0
    adata = simulate_scatac(n_cells=60, n_peaks=n_peaks, n_types=2, density=(0.1, 0.2), seed=seed)
    adata.obs["batch"] = pd.Categorical(np.where(np.arange(60) % 2, "x", "y"))
    SCALE.setup_anndata(adata, batch_key="batch")
    model = SCALE(adata, n_centroids=2, n_latent=3, n_hidden=(8,))
    model.train(max_epochs=2, batch_size=20, enable_progress_bar=False)
    return model


@pytest.fixture(scope="module")
def model() -> SCALE:
    return _train(seed=3)


@pytest.fixture(scope="module")
def other_model() -> SCALE:
    return _train(seed=4, n_peaks=30)


def _assert_same_weights(a: SCALE, b: SCALE) -> None:
    state_a, state_b = a.module.state_dict(), b.module.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------- no code from a file
class _RunsCommand:
    """Pickles as a call of os.system, as a malicious model file would."""

    def __init__(self, marker: Path):
        self.command = f"\"{sys.executable}\" -c \"open(r'{marker}', 'w').close()\""

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def crafted(model, tmp_path) -> tuple[Path, Path]:
    """A folder whose model.pt is a real one with a command-running object in its attributes."""
    folder, marker = tmp_path / "crafted", tmp_path / "marker"
    model.save(folder, save_anndata=True)
    saved = torch.load(folder / "model.pt", weights_only=False)
    saved["attr_dict"]["payload_"] = _RunsCommand(marker)
    torch.save(saved, folder / "model.pt")
    return folder, marker


def test_crafted_file_runs_its_command_when_unpickled_without_restriction(crafted) -> None:
    """The payload is real: an unrestricted read runs it (what scvi-tools' own read does)."""
    folder, marker = crafted
    torch.load(folder / "model.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    "read",
    [
        lambda folder, model: SCALE.load(folder),
        lambda folder, model: SCALE.load(folder, adata=model.adata.copy()),
        lambda folder, model: SCALE.load_query_data(model.adata.copy(), folder),
        lambda folder, model: SCALE.load_query_data(model.adata.copy(), str(folder)),
        lambda folder, model: SCALE.prepare_query_anndata(model.adata.copy(), str(folder)),
        lambda folder, model: SCALE.load_registry(str(folder)),
        lambda folder, model: SCALE.view_setup_args(str(folder)),
    ],
    ids=["load", "load_adata", "query_path", "query_str", "prepare_query", "registry", "view"],
)
def test_crafted_model_file_is_refused_and_runs_nothing(crafted, model, read) -> None:
    folder, marker = crafted
    with pytest.raises(ValueError, match=r"Refusing to load .*model\.pt.*system") as info:
        read(folder, model)
    assert str(folder) in str(info.value)
    assert "nothing from the file was executed" in str(info.value)
    assert not marker.exists()


def test_scvi_tools_own_read_is_restricted_too(crafted, model, monkeypatch) -> None:
    """Without the early check, the read scvi-tools makes itself still refuses the file."""
    folder, marker = crafted
    monkeypatch.setattr(_io, "check_model_file", lambda *args, **kwargs: None)
    with pytest.raises(ValueError, match=r"Refusing to load .*model\.pt"):
        SCALE.load(folder)
    assert not marker.exists()
    # and the module scvi-tools reads with is restored afterwards
    from scvi.model.base import _save_load

    assert _save_load.torch is torch


def test_multimodal_model_file_reads_restricted(tmp_path) -> None:
    scvi.settings.seed = 0
    mdata = simulate_multiome(n_cells=40, n_peaks=30, n_genes=20, n_types=2, seed=0)
    SCALE.setup_mudata(mdata)
    model = SCALE(mdata, n_centroids=2, n_hidden=(8,))
    model.train(max_epochs=1, enable_progress_bar=False)
    model.save(tmp_path / "mm", save_anndata=True)
    _io.read_model_file(tmp_path / "mm" / "model.pt")
    loaded = SCALE.load(tmp_path / "mm")
    _assert_same_weights(model, loaded)


def test_setup_records_only_its_arguments(model, tmp_path) -> None:
    """The registry saved with a model holds setup's arguments, not the peak matrix."""
    setup_args = model.adata_manager.registry["setup_args"]
    assert set(setup_args) == {
        "layer",
        "batch_key",
        "categorical_covariate_keys",
        "continuous_covariate_keys",
        "min_cells",
        "min_fraction",
        "n_top_peaks",
        "n_min_peaks",
        "min_open_share",
    }


# ---------------------------------------------------------------- bad files
@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda data: b"", r"it is empty, 0 bytes.*truncated or corrupt"),
        (lambda data: data[: len(data) // 2], r"truncated or corrupt"),
        (lambda data: data[:-100], r"truncated or corrupt"),
        (lambda data: b"not a model" * 10, r"truncated or corrupt"),
    ],
    ids=["empty", "half", "tail_cut", "garbage"],
)
@pytest.mark.parametrize("with_adata", [False, True])
def test_damaged_model_file_names_the_file_and_cause(
    model, tmp_path, damage, match, with_adata
) -> None:
    folder = tmp_path / "damaged"
    model.save(folder, save_anndata=True)
    path = folder / "model.pt"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=match) as info:
        SCALE.load(folder, adata=model.adata.copy() if with_adata else None)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- atomic saves
def _failing_torch_save(obj, f, *args, **kwargs):
    with open(f, "wb") as handle:  # half a file, then the disk is full
        handle.write(b"PK\x03\x04" + b"\0" * 100)
    raise OSError(28, "No space left on device")


def test_failed_save_keeps_the_previous_model(model, other_model, tmp_path, monkeypatch) -> None:
    folder = tmp_path / "model"
    model.save(folder, save_anndata=True)
    before = sorted(os.listdir(folder))
    monkeypatch.setattr(torch, "save", _failing_torch_save)
    with pytest.raises(OSError, match="No space left"):
        other_model.save(folder, overwrite=True, save_anndata=True)
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == before  # nothing half-written left behind
    loaded = SCALE.load(folder)
    _assert_same_weights(model, loaded)
    assert loaded.adata.var_names.equals(model.adata.var_names)


def test_failed_data_write_keeps_the_previous_model(
    model, other_model, tmp_path, monkeypatch
) -> None:
    folder = tmp_path / "model"
    model.save(folder, save_anndata=True)

    def fail(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ad.AnnData, "write", fail)
    with pytest.raises(OSError, match="Input/output"):
        other_model.save(folder, overwrite=True, save_anndata=True)
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == ["adata.h5ad", "model.pt"]
    _assert_same_weights(model, SCALE.load(folder))


def test_failed_save_into_a_new_folder_leaves_no_folder(model, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch, "save", _failing_torch_save)
    with pytest.raises(OSError):
        model.save(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_save_without_data_removes_another_models_data(model, other_model, tmp_path) -> None:
    folder = tmp_path / "model"
    model.save(folder, save_anndata=True)
    (folder / "notes.txt").write_text("kept")
    other_model.save(folder, overwrite=True, save_anndata=False)
    assert sorted(os.listdir(folder)) == ["model.pt", "notes.txt"]
    with pytest.raises(ValueError, match=r"saved without its data .*pass the data"):
        SCALE.load(folder)
    loaded = SCALE.load(folder, adata=other_model.adata.copy())
    _assert_same_weights(other_model, loaded)
    # with data again, the pair is the new one
    other_model.save(folder, overwrite=True, save_anndata=True)
    loaded = SCALE.load(folder)
    assert loaded.adata.var_names.equals(other_model.adata.var_names)


def test_save_keeps_files_under_another_prefix(model, other_model, tmp_path) -> None:
    folder = tmp_path / "model"
    model.save(folder, save_anndata=True, prefix="a_")
    other_model.save(folder, overwrite=True, save_anndata=False, prefix="b_")
    assert sorted(os.listdir(folder)) == ["a_adata.h5ad", "a_model.pt", "b_model.pt"]
    _assert_same_weights(model, SCALE.load(folder, prefix="a_"))


def test_save_into_an_existing_folder_needs_overwrite(model, tmp_path) -> None:
    (tmp_path / "model").mkdir()
    with pytest.raises(ValueError, match="overwrite=True"):
        model.save(tmp_path / "model")


def test_legacy_conversion_is_refused(tmp_path) -> None:
    with pytest.raises(NotImplementedError, match="legacy"):
        SCALE.convert_legacy_save(str(tmp_path), str(tmp_path / "out"))


# ---------------------------------------------------------------- peak identity
def _renamed(adata: ad.AnnData) -> ad.AnnData:
    adata = adata.copy()
    names = adata.var_names.to_numpy().copy()
    names[5] = "chr9:1-2"
    adata.var_names = names
    return adata


METHODS = {
    "latent": lambda m, a: m.get_latent_representation(a),
    "cluster_probabilities": lambda m, a: m.get_cluster_probabilities(a),
    "cluster_assignments": lambda m, a: m.get_cluster_assignments(a),
    "normalized_accessibility": lambda m, a: m.get_normalized_accessibility(a),
    "marginal_ll": lambda m, a: m.get_marginal_ll(a, n_mc_samples=2),
    "elbo": lambda m, a: m.get_elbo(a),
    "differential": lambda m, a: m.differential_accessibility(a, groupby="batch", group1="x"),
}


@pytest.mark.parametrize("method", list(METHODS), ids=list(METHODS))
@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a[:, ::-1].copy(), r"40 of its 40 peaks differ or are in another order"),
        (_renamed, r"1 of its 40 peaks differ .*position 5.*'chr9:1-2'"),
    ],
    ids=["reversed", "renamed"],
)
def test_methods_refuse_data_on_other_peaks(model, method, change, match) -> None:
    other = change(model.adata)
    with pytest.raises(ValueError, match=match) as info:
        METHODS[method](model, other)
    assert "does not have the peaks of this model" in str(info.value)


def test_methods_accept_a_copy_on_the_same_peaks(model) -> None:
    copy = model.adata.copy()
    np.testing.assert_array_equal(
        model.get_latent_representation(copy), model.get_latent_representation()
    )


def test_multimodal_methods_refuse_renamed_genes() -> None:
    scvi.settings.seed = 0
    mdata = simulate_multiome(n_cells=40, n_peaks=30, n_genes=20, n_types=2, seed=0)
    SCALE.setup_mudata(mdata)
    model = SCALE(mdata, n_centroids=2, n_hidden=(8,))
    model.train(max_epochs=1, enable_progress_bar=False)
    other = mdata.copy()
    other.mod["rna"].var_names = [f"g{i}" for i in range(other.mod["rna"].n_vars)][::-1]
    other.update()
    with pytest.raises(ValueError, match=r"mdata\['rna'\] does not have the features of this"):
        model.get_latent_representation(other)


def test_fixture_of_0_1_0_loads_through_the_restricted_reader(tmp_path) -> None:
    """The 0.1.0 file (with the peak matrix its registry kept) passes the allow-list."""
    fixture = Path(__file__).parent / "data" / "scale_model_v0.1.0"
    shutil.copytree(fixture, tmp_path / "fixture")
    saved = _io.read_model_file(tmp_path / "fixture" / "model.pt")
    assert "matrix" in saved["attr_dict"]["registry_"]["setup_args"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = SCALE.load(tmp_path / "fixture")
    assert loaded.is_trained


# ---------------------------------------------------------------- canonical sparse input
@pytest.fixture(scope="module")
def canonical_and_not():
    adata = simulate_scatac(n_cells=90, n_peaks=60, n_types=3, density=(0.1, 0.3), seed=5)
    canonical = sp.csr_matrix(adata.X, dtype=np.float32)
    messy = not_canonical(canonical)
    assert not messy.has_canonical_format and messy.nnz > 1.5 * canonical.nnz
    np.testing.assert_array_equal(messy.toarray(), canonical.toarray())
    return adata, canonical, messy


def _fit(adata, X, load_sparse_tensor: bool):
    adata = adata.copy()
    adata.X = X
    scvi.settings.seed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SCALE.setup_anndata(adata)
    model = SCALE(adata, n_centroids=3, n_latent=3, n_hidden=(16,))
    model.train(
        max_epochs=4,
        batch_size=16,
        load_sparse_tensor=load_sparse_tensor,
        enable_progress_bar=False,
    )
    return model, model.get_latent_representation()


@pytest.mark.parametrize("load_sparse_tensor", [True, False], ids=["sparse", "dense"])
def test_non_canonical_input_trains_the_same_model(canonical_and_not, load_sparse_tensor):
    """Same data, canonical or not: the same model on the same (sparse or dense) path."""
    adata, canonical, messy = canonical_and_not
    indices, data = messy.indices.copy(), messy.data.copy()
    reference, z_reference = _fit(adata, canonical, load_sparse_tensor)
    model, z = _fit(adata, messy, load_sparse_tensor)
    np.testing.assert_allclose(z, z_reference, atol=1e-6)
    np.testing.assert_allclose(
        model.history["elbo_train"].to_numpy(dtype=float),
        reference.history["elbo_train"].to_numpy(dtype=float),
        rtol=1e-6,
    )
    # the user's matrix is as it was
    np.testing.assert_array_equal(messy.indices, indices)
    np.testing.assert_array_equal(messy.data, data)


def test_non_canonical_input_warns_at_setup(canonical_and_not) -> None:
    adata, _, messy = canonical_and_not
    adata = adata.copy()
    adata.X = messy
    with pytest.warns(UserWarning, match=r"adata.X is a sparse matrix with duplicate.*sum_dup"):
        SCALE.setup_anndata(adata)


def test_canonical_input_is_read_without_a_copy(canonical_and_not) -> None:
    adata, canonical, messy = canonical_and_not
    for X, same in ((canonical, True), (messy, False)):
        data = adata.copy()
        data.X = X
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            SCALE.setup_anndata(data)
        manager = SCALE(data, n_centroids=2, n_hidden=(8,)).adata_manager
        loaded = [manager.create_torch_dataset(load_sparse_tensor=True) for _ in range(2)]
        assert (loaded[0].data["X"] is data.X) is same
        assert loaded[0].data["X"] is loaded[1].data["X"]  # one copy for loaders alive together
        assert loaded[0].data["X"].has_canonical_format
