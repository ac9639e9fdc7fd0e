"""Data splitter that hands sparse minibatches to the module as they are."""

from __future__ import annotations

from scvi.dataloaders import DataSplitter


class SparseDataSplitter(DataSplitter):
    """:class:`~scvi.dataloaders.DataSplitter` that keeps sparse minibatches sparse.

    With ``load_sparse_tensor=True`` scvi-tools' splitter loads CSR minibatches and then, once
    they are on the device, turns them into dense tensors for modules that expect those.
    SCALE's modules compute with sparse input directly (the encoder's first layer and the
    Bernoulli term cost what the open peaks cost), so here the minibatch reaches the module
    as it was loaded: no dense ``(batch, peaks)`` tensor is built, on the CPU or the GPU.
    """

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Return the minibatch unchanged (sparse tensors stay sparse)."""
        return batch
