"""Every method that takes new data checks it is on the model's peaks (and genes)."""

from __future__ import annotations

from ._validation import validate_var_names


class FeatureIdentityMixin:
    """Refuse data whose features differ from the model's, by name or by order.

    scvi-tools checks only the number of features of new data, so data on other peaks
    (or the same peaks in another order) would silently be read as the model's peaks.
    Overriding ``_validate_anndata``, which every method taking ``adata=`` calls, makes all
    of them raise the ``ValueError`` of :meth:`~scale_scvi.SCALE.load`. Must come before
    scvi-tools' ``BaseModelClass`` in the bases.
    """

    def _validate_anndata(self, adata=None, copy_if_view: bool = True):
        if adata is not None and adata is not self.adata:
            expected = self._model_var_names()
            if expected is not None:
                validate_var_names(expected, adata, "this model")
        return super()._validate_anndata(adata, copy_if_view=copy_if_view)

    def _model_var_names(self):
        """The model's features (a dict per modality for a MuData), or ``None`` if unknown."""
        try:
            return self.get_var_names()
        except (KeyError, TypeError):  # loaded without data and without a single "X" field
            return None
