"""Data splitter that decides the layout of the training minibatches."""

from __future__ import annotations

import torch
from scvi import REGISTRY_KEYS
from scvi.dataloaders import DataSplitter

#: The registered data matrices (peaks; RNA counts and peaks of a MuData).
_MATRIX_KEYS = (REGISTRY_KEYS.X_KEY, REGISTRY_KEYS.ATAC_X_KEY)


class SparseDataSplitter(DataSplitter):
    """:class:`~scvi.dataloaders.DataSplitter` that hands the module sparse minibatches.

    The one place where the layout of the training minibatches is decided: with
    ``load_sparse_tensor=True`` (``SCALE.train``'s default on the CPU) every data matrix
    reaches the module as a CSR tensor, whether the AnnData stores it sparse (loaded as CSR,
    where scvi-tools' own splitter would densify it after the transfer) or dense (converted
    here); with ``False`` (the default on a GPU) as dense tensors. SCALE's modules compute
    with either layout as it comes: the encoder's first layer and the Bernoulli term cost
    what the open peaks cost on CSR, and no dense ``(batch, peaks)`` tensor is built.
    """

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """The minibatch with its data matrices in the chosen layout."""
        if not self.load_sparse_tensor:
            return super().on_after_batch_transfer(batch, dataloader_idx)
        for key in _MATRIX_KEYS:
            x = batch.get(key)
            if isinstance(x, torch.Tensor) and x.layout == torch.strided and x.dim() == 2:
                batch[key] = x.to_sparse_csr()
            elif isinstance(x, torch.Tensor) and x.layout == torch.sparse_csc:
                batch[key] = x.to_sparse_csr()
        return batch
