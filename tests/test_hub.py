"""scvi-hub: a SCALE model with its metadata and model card, saved to a local folder and
loaded back through :class:`scvi.hub.HubModel` (no network)."""

from __future__ import annotations

import anndata
import numpy as np
import pytest

from scale_scvi import SCALE

hf = pytest.importorskip("huggingface_hub", reason="scvi.hub needs huggingface_hub")


def test_hub_round_trip(small_adata, tmp_path):
    from scvi.hub import HubMetadata, HubModel

    SCALE.setup_anndata(small_adata)
    model = SCALE(small_adata, n_centroids=4, n_hidden=(16,))
    model.train(max_epochs=2, enable_progress_bar=False)
    folder = str(tmp_path / "scale_hub")
    model.save(folder, save_anndata=True)

    metadata = HubMetadata.from_dir(
        folder, anndata_version=anndata.__version__, model_parent_module="scale_scvi"
    )
    card = hf.ModelCard(
        "---\nlicense: mit\nlibrary_name: scvi-tools\ntags: [scale-scvi, single-cell, atac]\n"
        "---\n# SCALE on simulated scATAC-seq\n\nFour cell types, 200 cells x 300 peaks.\n"
    )
    HubModel(folder, metadata=metadata, model_card=card).save(overwrite=True)

    hub = HubModel(folder)  # metadata and card read back from the folder
    assert hub.metadata.model_cls_name == "SCALE"
    assert hub.metadata.model_parent_module == "scale_scvi"
    assert "SCALE on simulated scATAC-seq" in hub.model_card.content
    loaded = hub.model  # SCALE.load with the AnnData saved beside the model
    assert isinstance(loaded, SCALE)
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation(), rtol=1e-5
    )
    np.testing.assert_array_equal(
        np.asarray(loaded.get_cluster_assignments()), np.asarray(model.get_cluster_assignments())
    )
    np.testing.assert_allclose(
        loaded.get_normalized_accessibility(),
        model.get_normalized_accessibility(),
        rtol=1e-5,
        atol=1e-6,
    )
