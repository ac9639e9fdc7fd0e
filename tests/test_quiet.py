"""Progress on stderr, and no third-party warnings or log lines that SCALE's choices cause."""

from __future__ import annotations

import logging
import warnings

from scale_scvi import SCALE


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
