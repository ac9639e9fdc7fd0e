"""Model folders: read without running code from the file, written without losing a model.

A model folder holds ``{prefix}model.pt`` (weights, peak names and the model's attributes,
written by :func:`torch.save`) and, when saved with the data, ``{prefix}adata.h5ad`` or
``{prefix}mdata.h5mu``.

Reading. :func:`torch.load` with ``weights_only=False`` (what scvi-tools passes) unpickles
arbitrary objects, and unpickling can call any function the file names, such as
``os.system``. torch's ``weights_only=True`` reader cannot read scvi-tools' model files:
their registry holds a ``collections.defaultdict``, which that reader refuses to fill
(torch 2.13: "Can only SETITEMS for dict, collections.OrderedDict, collections.Counter"),
whatever the allow-list. So every read of a model file here unpickles with
:class:`RestrictedUnpickler`, whose ``find_class`` hands out only the functions and classes
of :data:`MODEL_FILE_GLOBALS`, the few a model file holds (Python's documented way of
restricting unpickling); anything else is refused before it can be called. The reads
scvi-tools makes itself (in ``load``, ``load_query_data``, ``prepare_query_anndata``,
``load_registry``) are routed through the same reader by :func:`restricted_model_reads`.

Writing. :meth:`ModelFolderMixin.save` writes every file into a temporary folder inside the
target folder and then moves them into place with :func:`os.replace`, so a save that fails
while writing (full disk, interrupt, unwritable data) leaves the previous model as it was.
"""

from __future__ import annotations

import _codecs
import _compat_pickle
import collections
import os
import pickle
import shutil
import tempfile
import threading
import types
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch._utils
from mudata import MuData
from pandas._libs.internals import _unpickle_block
from pandas.core.indexes.base import _new_Index
from pandas.core.internals.managers import BlockManager
from scvi.model.base import ArchesMixin, BaseModelClass
from scvi.model.base import _save_load as scvi_save_load

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

#: The functions and classes a SCALE model file may name, under the names it names them
#: by. Found by listing the globals of saved single- and multimodal models, query models
#: and the 0.1.0 test fixture (``torch._weights_only_unpickler.get_globals_in_pkl``):
#: torch's tensor rebuilding (storages are resolved by torch itself), numpy arrays of peak
#: names and cell indices (protocol-2 bytes through ``_codecs.encode``), pandas frames of
#: the training history, the ``defaultdict`` of scvi-tools' registry, and, in files of
#: scale-scvi 0.1.0 only, a ``csr_matrix`` and the ``MuData`` class, which their registry
#: recorded by mistake. None of them reads files, runs commands or evaluates code.
MODEL_FILE_GLOBALS: dict[str, object] = {
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "collections.OrderedDict": collections.OrderedDict,
    "collections.defaultdict": collections.defaultdict,
    "builtins.dict": dict,
    "builtins.slice": slice,
    "builtins.bytes": bytes,
    "_codecs.encode": _codecs.encode,
    # numpy >= 2 and numpy < 2 name the same function differently
    "numpy._core.multiarray._reconstruct": _reconstruct,
    "numpy.core.multiarray._reconstruct": _reconstruct,
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
    "pandas.core.frame.DataFrame": pd.DataFrame,
    "pandas.core.indexes.base.Index": pd.Index,
    "pandas.core.indexes.base._new_Index": _new_Index,
    "pandas.core.internals.managers.BlockManager": BlockManager,
    "pandas._libs.internals._unpickle_block": _unpickle_block,
    "scipy.sparse._csr.csr_matrix": sp.csr_matrix,
    "mudata._core.mudata.MuData": MuData,
}

MODEL_FNAME = "model.pt"
DATA_FNAMES = ("adata.h5ad", "mdata.h5mu")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals of :data:`MODEL_FILE_GLOBALS`.

    Unpickling calls only what ``find_class`` returns (and methods of the objects those
    build), so a file naming anything else, such as ``os.system`` or ``builtins.eval``, is
    refused with a :class:`pickle.UnpicklingError` before anything from it runs.
    """

    def find_class(self, module: str, name: str):
        # Protocol 2 names Python 3's builtins by their Python 2 module, as pickle maps them
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = MODEL_FILE_GLOBALS.get(f"{module}.{name}")
        if found is None:
            raise pickle.UnpicklingError(f"Unsupported global: {module}.{name}")
        return found


#: What :func:`torch.load` takes as ``pickle_module``: a module with ``Unpickler`` and
#: ``load``.
restricted_pickle = types.ModuleType("restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load()


def model_file_path(dir_path: str | os.PathLike, prefix: str | None = None) -> str:
    """Path of the model file in a model folder."""
    return os.path.join(os.fspath(dir_path), f"{prefix or ''}{MODEL_FNAME}")


def _refused_error(path: str, error: Exception) -> ValueError:
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    return ValueError(
        f"Refusing to load {path!r}: {detail}. A SCALE model file never holds such an "
        "object, and unpickling it could run code; nothing from the file was executed. "
        "Only load model files from sources you trust; if this one is yours, save the model "
        "again with this version of scale-scvi."
    )


def _corrupt_file_error(path: str, cause: str) -> ValueError:
    return ValueError(
        f"{path!r} cannot be read as a model file ({cause}): it is truncated or corrupt, most "
        "likely written by a save that was interrupted or left incomplete by a copy or "
        "download. Save the model again, or copy the whole folder again."
    )


def _load(path: str, map_location=None, mmap: bool = False):
    """:func:`torch.load` of a model file with :class:`RestrictedUnpickler`."""
    return torch.load(
        path,
        map_location=map_location,
        weights_only=False,  # the restriction is the pickle module's
        pickle_module=restricted_pickle,
        mmap=mmap,
    )


def read_model_file(path: str | os.PathLike, map_location=None, mmap: bool = True) -> dict:
    """Read a model file without executing code from it.

    Parameters
    ----------
    path
        Path of a ``model.pt`` written by :meth:`~scale_scvi.SCALE.save`.
    map_location
        As in :func:`torch.load`.
    mmap
        Memory-map the file, so that its tensors are not read until used.

    Returns
    -------
    The saved dictionary (``model_state_dict``, ``var_names``, ``attr_dict``).

    Raises
    ------
    ValueError
        When the file is empty, truncated or corrupt, or names a function or class outside
        :data:`MODEL_FILE_GLOBALS` (the error names the file and the cause).
    """
    path = os.fspath(path)
    if os.path.getsize(path) == 0:
        raise _corrupt_file_error(path, "it is empty, 0 bytes")
    if not zipfile.is_zipfile(path):
        raise _corrupt_file_error(path, "it is not the zip archive torch.save writes")
    try:
        saved = _load(path, map_location, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise _refused_error(path, error) from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise _corrupt_file_error(path, f"{type(error).__name__}: {error}") from None
    if not isinstance(saved, dict):
        raise _corrupt_file_error(path, f"it holds a {type(saved).__name__}, not a dict")
    return saved


def check_model_file(dir_path: str | os.PathLike, prefix: str | None = None) -> None:
    """Read the model file of a folder, if there is one, to report a bad file clearly."""
    path = model_file_path(dir_path, prefix)
    if os.path.isfile(path):
        read_model_file(path)


class _TorchWithRestrictedLoad(types.ModuleType):
    """``torch`` as scvi-tools' saving module sees it, with :func:`read_model_file` as load."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, **kwargs):
        return read_model_file(f, map_location=map_location, mmap=False)


@contextmanager
def restricted_model_reads() -> Iterator[None]:
    """Make scvi-tools read model files with :func:`read_model_file` inside the block.

    scvi-tools' ``_load_saved_files`` (behind ``load``, ``load_query_data``,
    ``prepare_query_anndata`` and ``load_registry``) calls ``torch.load(...,
    weights_only=False)``; inside the block, the ``torch`` its module calls is a view of
    torch whose ``load`` is the restricted reader. Only that module is affected, only while
    a block runs (in any thread; blocks may overlap), and only to restrict what it reads.
    """
    global _restricted_depth
    with _restricted_lock:
        if _restricted_depth == 0:
            scvi_save_load.torch = _TorchWithRestrictedLoad("torch")
        _restricted_depth += 1
    try:
        yield
    finally:
        with _restricted_lock:
            _restricted_depth -= 1
            if _restricted_depth == 0:
                scvi_save_load.torch = torch


_restricted_lock = threading.Lock()
_restricted_depth = 0  # blocks of restricted_model_reads running (in any thread)


def _move_into_place(source: str, target: str, prefix: str | None) -> None:
    """Move a saved model's files from ``source`` into ``target``, replacing ours there.

    Data files of an earlier save in ``target`` go first, then the model file is replaced,
    then the new data file (if any) moves in: at no point does ``target`` pair a model file
    with data saved by another model (an interruption between the steps can leave the
    model without its data, never with the wrong data).
    """
    names = {f"{prefix or ''}{name}" for name in DATA_FNAMES}
    for name in names:
        stale = os.path.join(target, name)
        if os.path.lexists(stale):
            os.remove(stale)
    model_name = f"{prefix or ''}{MODEL_FNAME}"
    os.replace(os.path.join(source, model_name), os.path.join(target, model_name))
    for name in names:
        if os.path.exists(os.path.join(source, name)):
            os.replace(os.path.join(source, name), os.path.join(target, name))


class ModelFolderMixin:
    """Safe reading and atomic writing of model folders for an scvi-tools model class.

    Must come before scvi-tools' ``BaseModelClass`` and ``ArchesMixin`` in the bases.
    """

    def save(
        self,
        dir_path: str | os.PathLike,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **kwargs,
    ) -> None:
        """Save the model, replacing an earlier save only once the new one is written.

        As :meth:`scvi.model.base.BaseModelClass.save` (same arguments and files), except
        that the files are first written into a temporary folder inside ``dir_path`` and
        then moved into place: a save that fails while writing leaves the model saved there
        before untouched (a process killed while writing leaves a hidden ``.saving-*``
        folder in ``dir_path``, which may be deleted). With ``save_anndata=False``, a data
        file an earlier save left in ``dir_path`` (under the same ``prefix``) is removed, so
        that ``load(dir_path)`` never pairs this model with another model's data. Other
        files in the folder are left alone.

        Parameters
        ----------
        dir_path
            Folder to save into.
        prefix
            Prefix of the file names.
        overwrite
            Replace a model saved in ``dir_path``; without it an existing folder is refused.
        save_anndata
            Save the data with the model.
        **kwargs
            Further arguments of :meth:`scvi.model.base.BaseModelClass.save`.
        """
        dir_path = os.fspath(dir_path)
        # The module's settings are saved as they are, not as defaults that may change.
        settings = getattr(self.module, "settings", None)
        if settings:
            kwargs_of_init = self.init_params_.setdefault("kwargs", {})
            kwargs_of_init.setdefault("module_kwargs", {}).update(settings)
        if os.path.exists(dir_path) and not overwrite:
            raise ValueError(
                f"{dir_path} already exists. Pass overwrite=True to replace the model saved "
                "there, or choose another folder."
            )
        created = not os.path.exists(dir_path)
        os.makedirs(dir_path, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".saving-", dir=dir_path)
        try:
            super().save(
                staging, prefix=prefix, overwrite=True, save_anndata=save_anndata, **kwargs
            )
            _move_into_place(staging, dir_path, prefix)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if created and not os.listdir(dir_path):
                os.rmdir(dir_path)
            raise
        shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def load(
        cls, dir_path: str | os.PathLike, adata=None, *args, prefix: str | None = None, **kwargs
    ):
        """As :meth:`scvi.model.base.BaseModelClass.load`, reading the model file safely.

        A model folder without data (saved with ``save_anndata=False``) needs ``adata``.
        """
        check_model_file(dir_path, prefix)
        data_files = [os.path.join(os.fspath(dir_path), f"{prefix or ''}{n}") for n in DATA_FNAMES]
        if (
            adata is None
            and os.path.isfile(model_file_path(dir_path, prefix))
            and not any(os.path.exists(f) for f in data_files)
        ):
            raise ValueError(
                f"{os.fspath(dir_path)!r} holds a model saved without its data (no "
                f"{' or '.join(os.path.basename(f) for f in data_files)}); pass the data "
                "with the model's features as adata=."
            )
        with restricted_model_reads(), restoring_saved_weights():
            return super().load(dir_path, adata, *args, prefix=prefix, **kwargs)

    @classmethod
    def load_query_data(cls, adata=None, reference_model=None, *args, **kwargs):
        """As :meth:`scvi.model.base.ArchesMixin.load_query_data`, reading a saved reference
        model (a folder) safely."""
        with restoring_saved_weights():
            return _with_reference(super().load_query_data, adata, reference_model, args, kwargs)

    @staticmethod
    def prepare_query_anndata(adata, reference_model, *args, **kwargs):
        """As :meth:`scvi.model.base.ArchesMixin.prepare_query_anndata`, reading a saved
        reference model (a folder) safely."""
        return _with_reference(
            ArchesMixin.prepare_query_anndata, adata, reference_model, args, kwargs
        )

    @staticmethod
    def prepare_query_mudata(mdata, reference_model, *args, **kwargs):
        """As :meth:`scvi.model.base.ArchesMixin.prepare_query_mudata`, reading a saved
        reference model (a folder) safely."""
        return _with_reference(
            ArchesMixin.prepare_query_mudata, mdata, reference_model, args, kwargs
        )

    @staticmethod
    def load_registry(dir_path: str, prefix: str | None = None) -> dict:
        """As :meth:`scvi.model.base.BaseModelClass.load_registry`, reading the file safely."""
        check_model_file(dir_path, prefix)
        with restricted_model_reads():
            return BaseModelClass.load_registry(dir_path, prefix)

    @staticmethod
    def view_setup_args(dir_path: str, prefix: str | None = None) -> None:
        """As :meth:`scvi.model.base.BaseModelClass.view_setup_args`, reading the file safely."""
        check_model_file(dir_path, prefix)
        with restricted_model_reads():
            BaseModelClass.view_setup_args(dir_path, prefix)

    @classmethod
    def convert_legacy_save(cls, *args, **kwargs) -> None:
        """Not supported: scale-scvi never wrote scvi-tools' legacy (< 0.15) format, whose
        setup file can only be read by unrestricted unpickling."""
        raise NotImplementedError(
            f"{cls.__name__} models are never saved in scvi-tools' legacy (< 0.15) format, "
            "and reading that format would unpickle its files without restriction."
        )


_RESTORING: ContextVar[bool] = ContextVar("scale_scvi_restoring", default=False)


@contextmanager
def restoring_saved_weights() -> Iterator[None]:
    """Mark the models made inside as about to receive saved weights (``load``,
    ``load_query_data``): what their constructor would fit on the data (the decoder's bias,
    the encoder's LSI basis) is replaced by the saved state, so it is not computed."""
    token = _RESTORING.set(True)
    try:
        yield
    finally:
        _RESTORING.reset(token)


def weights_will_be_restored() -> bool:
    """Whether the model being made will receive saved weights (see
    :func:`restoring_saved_weights`)."""
    return _RESTORING.get()


def _with_reference(method, data, reference_model, args: tuple, kwargs: dict):
    """``method(data, reference_model, ...)``, reading ``reference_model`` safely when it is
    a folder (rather than a model in memory)."""
    if not isinstance(reference_model, str | os.PathLike):
        return method(data, reference_model, *args, **kwargs)
    check_model_file(reference_model)
    with restricted_model_reads():
        return method(data, os.fspath(reference_model), *args, **kwargs)
