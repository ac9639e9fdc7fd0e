"""The encoder's input: a cell's coordinates on an LSI basis of the peaks."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from ._components import csr_row_indices, csr_with_values

#: Cells (drawn at random when there are more) whose peaks fit the LSI basis.
LSI_FIT_MAX_CELLS = 20_000

#: The scale of TF-IDF's term frequency, as in Signac's and ArchR's LSI.
_TF_SCALE = 1e4


class LSIProjection(nn.Module):
    """Fixed map of a cell's binarized peaks onto the leading singular vectors of TF-IDF.

    A cell with open peaks ``x_p`` (``n`` of them) becomes ``t_p = log(1 + 1e4 x_p idf_p /
    n)`` with ``idf_p = cells / cells with peak p open``, then ``u = V^T t`` with ``V`` the
    right singular vectors 2 .. ``n_components + 1`` of the cells' TF-IDF matrix (the first,
    which follows the depth, left out), then ``u / ||u|| * sqrt(n_components)``: latent
    semantic indexing (LSI) with the rows normalized, as scATAC analyses cluster it. ``idf``
    and ``V`` are buffers fitted once to the training data (:meth:`fit`), saved with the
    model and used unchanged on new cells; nothing here is trained.

    An encoder that reads these coordinates instead of the peaks has ``n_components`` inputs
    in place of tens of thousands, so on a few hundred cells it cannot fit each training
    cell's peaks (``benchmarks/NOTES.md``, "The encoder reads LSI coordinates").

    Parameters
    ----------
    n_peaks
        Number of peaks read.
    n_components
        Number of coordinates.
    """

    def __init__(self, n_peaks: int, n_components: int):
        super().__init__()
        self.n_components = int(n_components)
        self.register_buffer("idf", torch.zeros(n_peaks))
        self.register_buffer("basis", torch.zeros(n_peaks, self.n_components))

    @torch.no_grad()
    def fit(
        self,
        matrix,
        peak_index: np.ndarray | None = None,
        max_cells: int = LSI_FIT_MAX_CELLS,
        seed: int = 0,
        chunk: int = 10_000,
    ) -> LSIProjection:
        """Fit ``idf`` and the basis to a cells x peaks matrix (dense, sparse or backed).

        Read in chunks of ``chunk`` rows, binarized, cut to ``peak_index``; at most
        ``max_cells`` cells (drawn at random with ``seed``) make the TF-IDF matrix, kept
        sparse, whose truncated SVD (randomized, scikit-learn) gives the basis. With fewer
        cells or peaks than ``n_components + 2`` the basis has that many non-zero columns
        and the rest are zero.
        """
        from sklearn.decomposition import TruncatedSVD

        n_cells = matrix.shape[0]
        rows = np.arange(n_cells)
        if n_cells > max_cells:
            rows = np.sort(np.random.default_rng(seed).choice(n_cells, max_cells, replace=False))
        blocks = []
        for start in range(0, n_cells, chunk):
            take = rows[(rows >= start) & (rows < start + chunk)] - start
            if take.size == 0:
                continue
            block = sp.csr_matrix(matrix[start : start + chunk])[take]
            if peak_index is not None:
                block = block[:, peak_index]
            block = (block > 0).astype(np.float32)
            block.eliminate_zeros()
            blocks.append(block.tocsr())
        X = sp.vstack(blocks, format="csr")
        open_cells = np.asarray(X.sum(0), dtype=np.float64).ravel()
        idf = X.shape[0] / np.maximum(open_cells, 1.0)
        depth = np.maximum(np.asarray(X.sum(1), dtype=np.float64).ravel(), 1.0)
        X.data = np.log1p(_TF_SCALE * idf[X.indices] / np.repeat(depth, np.diff(X.indptr))).astype(
            np.float32
        )
        n_fit = min(self.n_components + 1, min(X.shape) - 1)
        basis = np.zeros((X.shape[1], self.n_components), dtype=np.float32)
        if n_fit >= 2:
            svd = TruncatedSVD(
                n_components=n_fit, algorithm="randomized", n_iter=7, random_state=seed
            )
            svd.fit(X)
            basis[:, : n_fit - 1] = svd.components_[1:].T
        self.idf.copy_(torch.as_tensor(idf, dtype=self.idf.dtype))
        self.basis.copy_(torch.as_tensor(basis))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The coordinates of binarized peaks ``x`` (dense, or sparse CSR), ``(cells, n)``."""
        idf = self.idf.to(self.basis.dtype)
        if x.layout == torch.strided:
            x = x.to(self.basis.dtype)
            depth = x.sum(-1, keepdim=True).clamp_min(1.0)
            u = torch.log1p(_TF_SCALE * x * idf / depth) @ self.basis
        else:
            x = x if x.layout == torch.sparse_csr else x.to_sparse_csr()
            values = x.values().to(self.basis.dtype)
            rows = csr_row_indices(x)
            depth = torch.zeros(x.shape[0], dtype=values.dtype, device=values.device)
            depth = depth.index_add_(0, rows, values).clamp_min(1.0)
            tfidf = torch.log1p(_TF_SCALE * values * idf[x.col_indices()] / depth[rows])
            u = torch.sparse.mm(csr_with_values(x, tfidf), self.basis)
        norm = u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return u / norm * float(np.sqrt(self.n_components))
