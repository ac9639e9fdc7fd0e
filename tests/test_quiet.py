"""Progress on stderr, and no third-party warnings or log lines that SCALE's choices cause."""

from __future__ import annotations

import logging
import warnings

from scale_scvi import SCALE
from scale_scvi.data import simulate_scatac


def test_training_writes_nothing_to_stdout_and_no_sparse_warnings(small_adata, capsys, tmp_path):
    SCALE.setup_anndata(small_adata)
    model = SCALE(small_adata, n_centroids=4, n_hidden=(16,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train(max_epochs=2, load_sparse_tensor=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert "Epoch 2/2" in err  # the progress bar, on stderr
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "Sparse" in m], messages
    assert not [m for m in messages if "log_every_n_steps" in m], messages


def test_load_does_not_log_a_download(small_adata, tmp_path, caplog):
    SCALE.setup_anndata(small_adata)
    model = SCALE(small_adata, n_centroids=4, n_hidden=(16,))
    model.train(max_epochs=1, enable_progress_bar=False)
    model.save(tmp_path / "model")
    with caplog.at_level(logging.INFO):
        SCALE.load(tmp_path / "model", adata=small_adata)
    assert "downloaded" not in caplog.text
    # scvi-tools' logger works as before outside SCALE.load
    assert not logging.getLogger("scvi.data._download").filters


def test_no_small_last_batch_warning_without_batch_norm():
    """225 training cells leave one over after seven minibatches of 32: scvi-tools warns of
    errors that only batch normalization would raise; the default encoder (layer norm)
    trains on that cell, and the warning is not shown. With batch norm the lone cell sits
    the epoch out (``drop_last``), so there is nothing to warn about either."""
    adata = simulate_scatac(n_cells=250, n_peaks=200, n_types=3, seed=0)
    for norm in ({}, {"use_batch_norm": "encoder", "use_layer_norm": "none"}):
        data = adata.copy()
        SCALE.setup_anndata(data)
        model = SCALE(data, n_centroids=3, n_hidden=(16,), **norm)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.train(max_epochs=1, enable_progress_bar=False)
        messages = [str(w.message) for w in caught]
        assert not [m for m in messages if "Last batch" in m], (norm, messages)
