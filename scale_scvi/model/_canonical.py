"""Sparse minibatches reach the module in canonical form, whatever the user's matrix holds.

A CSR (or CSC) matrix is canonical when each row's column indices are sorted and unique;
it may also store explicit zeros. scvi-tools hands a sparse minibatch to the module as the
stored entries of its rows, so a duplicate entry counts twice and a stored zero counts as
an entry; unsorted indices break the invariants of torch's CSR tensors. Dense minibatches
(``toarray``) are not affected: duplicates are summed and stored zeros are zeros.

The user's matrix is never modified. When it is canonical without stored zeros (checked
in one pass over its indices and values, no copy), minibatches are its rows as they are;
otherwise the data loaders read a canonical copy, made once and shared by all loaders
alive at a time.
"""

from __future__ import annotations

import warnings
import weakref

import numpy as np
import scipy.sparse as sp
from scvi import settings
from scvi.data import AnnDataManager, AnnTorchDataset
from torch.utils.data import Subset


def is_canonical(matrix) -> bool:
    """Whether ``matrix`` is dense, or sparse with sorted, unique indices and no stored zero.

    Reads the indices and values once without copying them (scipy caches the index check).
    Backed (on-disk) matrices are not read and count as canonical.
    """
    if not sp.issparse(matrix) or matrix.format not in ("csr", "csc"):
        return True
    return bool(matrix.has_canonical_format) and np.count_nonzero(matrix.data) == matrix.nnz


def canonical(matrix):
    """``matrix`` itself if canonical (:func:`is_canonical`), else a canonical copy.

    Duplicates are summed (as ``toarray`` does), indices sorted and stored zeros dropped.
    """
    if is_canonical(matrix):
        return matrix
    copy = matrix.copy()
    copy.sum_duplicates()
    copy.eliminate_zeros()
    return copy


def warn_if_not_canonical(matrix, what: str) -> None:
    """Warn that a sparse matrix is not canonical, and how to make it so in place."""
    if is_canonical(matrix):
        return
    warnings.warn(
        f"{what} is a sparse matrix with duplicate entries, unsorted indices or stored zeros; "
        "SCALE reads a canonical copy of it (duplicates summed, zeros dropped), which takes "
        "memory. To avoid the copy, make it canonical in place first: "
        f"{what}.sum_duplicates(); {what}.eliminate_zeros().",
        UserWarning,
        stacklevel=settings.warnings_stacklevel + 1,
    )


class CanonicalAnnTorchDataset(AnnTorchDataset):
    """:class:`~scvi.data.AnnTorchDataset` whose sparse minibatches are canonical."""

    @property
    def data(self):
        if not hasattr(self, "_data"):
            data = super().data
            if self.load_sparse_tensor:  # dense minibatches do not depend on the format
                data = {key: self.adata_manager.canonical(value) for key, value in data.items()}
            self._data = data
        return self._data


class CanonicalAnnDataManager(AnnDataManager):
    """:class:`~scvi.data.AnnDataManager` whose data loaders read canonical sparse data.

    The canonical copy of a non-canonical matrix is kept only while a loader uses it, and
    made again if the matrix is read after all its loaders are gone.
    """

    def canonical(self, matrix):
        """:func:`canonical` of a registered matrix, reusing a copy still in use."""
        cache = self.__dict__.setdefault("_canonical_copies", {})
        source_ref, copy_ref = cache.get(id(matrix), (lambda: None, lambda: None))
        copy = copy_ref() if source_ref() is matrix else None
        if copy is None:
            copy = canonical(matrix)
            if copy is not matrix:
                cache[id(matrix)] = (weakref.ref(matrix), weakref.ref(copy))
        return copy

    def create_torch_dataset(
        self,
        indices=None,
        data_and_attributes: list[str] | dict[str, np.dtype] | None = None,
        load_sparse_tensor: bool = False,
    ):
        """As :meth:`scvi.data.AnnDataManager.create_torch_dataset`, canonical minibatches."""
        dataset = CanonicalAnnTorchDataset(
            self, getitem_tensors=data_and_attributes, load_sparse_tensor=load_sparse_tensor
        )
        return dataset if indices is None else Subset(dataset, indices)
