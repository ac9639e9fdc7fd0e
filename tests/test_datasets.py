"""The tutorials' dataset loaders: local copies checked against their checksums, and the
download path served from a local HTTP server (no network)."""

from __future__ import annotations

import functools
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scale_scvi import datasets
from scale_scvi.data import shared_data_path


def test_local_copy_is_read_and_checked(monkeypatch):
    if shared_data_path(datasets.DATASETS["cell_lines"].file) is None:
        pytest.skip("the labeled data are not in SCALE_SCVI_DATA")
    folder = shared_data_path(datasets.DATASETS["cell_lines"].file).parent
    monkeypatch.setenv("SCALE_SCVI_DATA", str(folder))
    adata = datasets.cell_lines()
    assert adata.shape == (600, 5036) and adata.obs["cell_type"].nunique() == 12


def test_wrong_local_copy_and_missing_file(tmp_path, monkeypatch):
    monkeypatch.delenv("SCALE_SCVI_DATA_URL", raising=False)
    (tmp_path / datasets.DATASETS["forebrain"].file).write_bytes(b"not the data")
    with pytest.raises(ValueError, match="SHA-256"):
        datasets.forebrain(data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="GSE117089"):
        datasets.scicar_kidney(data_dir=tmp_path)
    with pytest.raises(ValueError, match="Unknown dataset"):
        datasets.fetch("pbmc", data_dir=tmp_path)


def test_download_is_checked(tmp_path):
    pytest.importorskip("pooch")
    entry = datasets.DATASETS["cell_lines"]
    source = shared_data_path(entry.file)
    if source is None:
        pytest.skip("the labeled data are not in SCALE_SCVI_DATA")
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(source, served / entry.file)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        path = datasets.fetch("cell_lines", data_dir=tmp_path / "cache", base_url=url)
        assert path.read_bytes() == source.read_bytes()
        (served / entry.file).write_bytes(b"tampered")
        with pytest.raises(ValueError, match="SHA256|hash"):
            datasets.fetch("cell_lines", data_dir=tmp_path / "other", base_url=url)
    finally:
        server.shutdown()
