"""Shared helpers of the benchmark runners: data, metrics, subprocess accounting, machine."""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
WORK = BENCH_DIR / "work"
RESULTS = BENCH_DIR / "results"
MAIN_PYTHON = sys.executable
ORIGINAL_VENV = BENCH_DIR / ".venv-scale"
ORIGINAL_PYTHON = ORIGINAL_VENV / "bin" / "python"
SNAPATAC2_VENV = BENCH_DIR / ".venv-snapatac2"
SNAPATAC2_PYTHON = SNAPATAC2_VENV / "bin" / "python"
SNAPATAC2_VERSION = "2.9.0"
ORIGINAL_VERSION = "1.1.2"
#: The original SCALE's encoder widths (this SCALE's default was the same until 2026-12-06).
ORIGINAL_N_HIDDEN = (1024, 128)

DATASETS = {
    "forebrain": "preissl2018_forebrain_1043cells.h5ad",
    "cell_lines": "schep2017_celllines_600cells.h5ad",
}


def prepare_dataset(
    name: str, min_open_fraction: float = 0.0, binarize: bool = True
) -> Path | None:
    """Write the CSR matrix and labels of a shared dataset to ``work/``.

    Every method reads this one file, so all of them see the same matrix. By default it is
    binarized; with ``min_open_fraction`` > 0 only the peaks open in at least that fraction
    of the cells are kept (``work/<name>_min<percent>.npz``). ``binarize=False`` keeps the
    matrix as shipped, every peak and its values (``work/<name>_shipped.npz``; the
    fraction must then be 0). Returns ``None`` when the shared data folder does not hold
    the dataset.
    """
    if not binarize and min_open_fraction > 0:
        raise ValueError("binarize=False keeps every peak: pass min_open_fraction=0.")
    import anndata as ad

    from scale_scvi.data import shared_data_path

    path = shared_data_path(DATASETS[name])
    if path is None:
        return None
    suffix = f"_min{min_open_fraction * 100:g}pct" if min_open_fraction > 0 else ""
    out = WORK / f"{name}{suffix if binarize else '_shipped'}.npz"
    if out.exists():
        return out
    WORK.mkdir(parents=True, exist_ok=True)
    adata = ad.read_h5ad(path)
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    if binarize:
        X.data = (X.data > 0).astype(np.float32)
    X.eliminate_zeros()
    if min_open_fraction > 0:
        open_in = np.bincount(X.indices, minlength=X.shape[1])
        X = X[:, open_in >= min_open_fraction * X.shape[0]].tocsr()
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    save_matrix(out, X, labels)
    return out


def train_default_path(
    file: str | Path,
    seed: int,
    model_kwargs: dict | None = None,
    setup_kwargs: dict | None = None,
    **train_kwargs,
):
    """What a user runs on a shared dataset (its file name) or another ``.h5ad`` (a
    :class:`~pathlib.Path`): the matrix as shipped, ``setup_anndata(adata, **setup_kwargs)``,
    ``SCALE(adata, **model_kwargs)``, ``train(**train_kwargs)`` (no progress bar), at
    ``scvi.settings.seed = seed``. Returns ``(adata, model, training seconds)``."""
    import anndata as ad
    import scvi

    from scale_scvi import SCALE
    from scale_scvi.data import shared_data_path

    adata = ad.read_h5ad(file if isinstance(file, Path) else shared_data_path(file))
    scvi.settings.seed = seed
    SCALE.setup_anndata(adata, **(setup_kwargs or {}))
    model = SCALE(adata, **(model_kwargs or {}))
    start = time.perf_counter()
    model.train(enable_progress_bar=False, **train_kwargs)
    return adata, model, time.perf_counter() - start


def save_readout_inputs(name: str, model, labels: np.ndarray, own: np.ndarray) -> Path:
    """Store what a readout of a trained latent needs, ``work/small_cells/<name>.npz``: the
    posterior means ``qz_m`` and variances ``qz_v`` of all cells, the training cells
    ``train_idx``, the ``labels`` and the model's own clusters ``own`` (read by
    ``merge_penalty.py``; ``name`` ends in ``_<training seed>``)."""
    qz_m, qz_v = model.get_latent_representation(return_dist=True)
    path = WORK / "small_cells" / f"{name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        qz_m=qz_m,
        qz_v=qz_v,
        train_idx=np.asarray(model.train_indices),
        labels=np.asarray(labels).astype(str),
        own=np.asarray(own).astype(str),
    )
    return path


def save_matrix(path: Path, X: sp.csr_matrix, labels: np.ndarray) -> None:
    """Store a CSR matrix and its labels in one ``.npz``."""
    np.savez(
        path,
        data=X.data,
        indices=X.indices,
        indptr=X.indptr,
        shape=np.asarray(X.shape),
        labels=np.asarray(labels, dtype=str),
    )


def load_matrix(path: str | Path) -> tuple[sp.csr_matrix, np.ndarray]:
    """Read a matrix written by :func:`save_matrix`."""
    f = np.load(path, allow_pickle=False)
    X = sp.csr_matrix((f["data"], f["indices"], f["indptr"]), shape=tuple(f["shape"]))
    return X, f["labels"]


def lsi_embedding(X, seed: int) -> np.ndarray:
    """LSI of a cells x peaks matrix, on its values as given: TF-IDF, log1p, truncated SVD
    with 30 kept components (the first, depth, dropped), rows L2-normalized (the cosine
    geometry LSI is usually clustered in)."""
    from sklearn.decomposition import TruncatedSVD

    X = sp.csr_matrix(X, dtype=np.float64)
    tf = sp.diags(1.0 / np.maximum(np.asarray(X.sum(1)).ravel(), 1.0)) @ X
    idf = X.shape[0] / np.maximum(np.asarray(X.sum(0)).ravel(), 1.0)
    tfidf = (tf @ sp.diags(idf)).tocsr()
    tfidf.data = np.log1p(tfidf.data * 1e4)
    svd = TruncatedSVD(n_components=31, random_state=seed, algorithm="randomized", n_iter=7)
    latent = svd.fit_transform(tfidf)[:, 1:]
    return latent / np.maximum(np.linalg.norm(latent, axis=1, keepdims=True), 1e-12)


def cluster_scores(latent: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """ARI and NMI of k-means (true k, ``n_init=20``) on a latent representation."""
    from sklearn.cluster import KMeans

    k = len(np.unique(labels))
    pred = KMeans(n_clusters=k, n_init=20, random_state=seed).fit_predict(latent)
    return label_scores(pred, labels)


def leiden_scores(latent: np.ndarray, labels: np.ndarray) -> dict:
    """ARI and NMI of Leiden clusters at scanpy's defaults on a latent representation.

    ``sc.pp.neighbors(adata, use_rep=...)`` with its defaults (15 neighbours, all dimensions of
    the representation), then ``sc.tl.leiden(adata)`` with its defaults (resolution 1.0,
    ``random_state=0``). From 8,192 cells on (Euclidean metric) scanpy 1.11.5 computes the
    neighbours with pynndescent, which under scipy 1.17 fails with ``'csr_array' object has no
    attribute 'getnnz'``; then, and only then, the same exact neighbours that scanpy computes
    below that size (``transformer="sklearn"``) are computed instead, and ``knn`` says so.
    """
    import warnings

    import anndata as ad
    import pandas as pd
    import scanpy as sc

    adata = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(len(latent))]))
    adata.obsm["X_emb"] = np.asarray(latent, dtype=np.float32)
    knn = "scanpy default"
    try:
        sc.pp.neighbors(adata, use_rep="X_emb")
    except AttributeError as err:
        if "getnnz" not in str(err):
            raise
        sc.pp.neighbors(adata, use_rep="X_emb", transformer="sklearn")
        knn = "exact (sklearn): pynndescent failed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scanpy's note on the igraph flavor
        sc.tl.leiden(adata)
    pred = adata.obs["leiden"].to_numpy()
    return {**label_scores(pred, labels), "n_clusters": int(len(np.unique(pred))), "knn": knn}


def embedding_scores(latent: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """k-means with the true k (ARI) and Leiden at scanpy's defaults (ARI, number of
    clusters) on an embedding, rounded as the result files store them."""
    leiden = leiden_scores(latent, labels)
    return {
        "ari_kmeans": round(cluster_scores(latent, labels, seed)["ari"], 4),
        "ari_leiden": round(leiden["ari"], 4),
        "n_leiden": leiden["n_clusters"],
    }


def label_scores(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """ARI and NMI of predicted labels."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {
        "ari": float(adjusted_rand_score(labels, pred)),
        "nmi": float(normalized_mutual_info_score(labels, pred)),
    }


def freeze_pre_norm_biases(module) -> int:
    """Stop training the biases of the linear layers that batch norm follows; return how many.

    In training, batch norm subtracts each unit's minibatch mean, so the objective does not
    depend on these biases: their gradient is rounding noise, which Adam's normalization
    turns into steps of the learning rate's size (``benchmarks/multiome_trajectory.py``), and
    in evaluation the running means follow them with a lag.
    """
    import torch

    n = 0
    for m in module.modules():
        if (
            isinstance(m, torch.nn.Sequential)
            and len(m) > 1
            and isinstance(m[0], torch.nn.Linear)
            and isinstance(m[1], torch.nn.BatchNorm1d)
            and m[0].bias is not None
        ):
            m[0].bias.requires_grad_(False)
            n += 1
    return n


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size of a running process (``VmHWM``), MB; 0 where unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def run_child(
    cmd: list[str], log: Path, timeout: float | None = None, env_extra: dict | None = None
) -> dict:
    """Run ``cmd`` in its own process; return its wall and CPU time, peak RSS, exit status.

    The peak resident set size is the child's ``VmHWM`` (``/proc/<pid>/status``), read every
    0.2 s while it runs (a peak in its last 0.2 s can be missed). ``ru_maxrss`` from
    ``os.wait4`` is returned too, as ``peak_rss_mb_rusage``, but is not the child's own: Linux
    carries the resident size of the image it replaced at ``exec`` into it, i.e. this
    process's size at the fork, so it is never below that. ``env_extra`` is added to the
    child's environment (e.g. thread counts).
    """
    env = dict(os.environ)
    env.update(env_extra or {})
    env.setdefault("TQDM_DISABLE", "1")
    # Every child runs in the same environment: PyTorch's huge-page allocations on (the
    # default of scale_scvi, set here explicitly for the original SCALE and PeakVI too).
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR), env.get("PYTHONPATH", "")])
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = None if timeout is None else t0 + timeout
        hwm_mb = 0.0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            hwm_mb = max(hwm_mb, vm_hwm_mb(proc.pid))
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "wall_s": time.perf_counter() - t0,
        "peak_rss_mb": hwm_mb if hwm_mb > 0 else usage.ru_maxrss / 1024.0,
        "peak_rss_mb_rusage": usage.ru_maxrss / 1024.0,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "returncode": proc.returncode,
    }


def read_json(path: Path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def append_rows(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    """Append ``rows`` to the CSV ``path``, with a header of ``fields`` (default: the first
    row's keys) if the file is new. An existing file keeps its header; a row with a column
    that header lacks stops the run (move the file aside first), and columns a row lacks
    are left empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    if new:
        fields = list(fields or rows[0])
    else:
        with open(path, newline="") as fh:
            fields = next(csv.reader(fh))
        missing = sorted({key for row in rows for key in row} - set(fields))
        if missing:
            raise SystemExit(f"{path} lacks columns {missing}; move it aside first.")
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def thin_reads(x: sp.csr_matrix, keep, rng: np.random.Generator) -> sp.csr_matrix:
    """Keep each read of the CSR count matrix ``x`` with probability ``keep`` (a number, or
    one per stored entry): binomial thinning of each entry, in place; entries left at zero are
    dropped."""
    x.data = rng.binomial(np.rint(x.data).astype(np.int64), keep).astype(np.float32)
    x.eliminate_zeros()
    return x


def record_row(path: Path, row: dict, fields: list[str] | None = None) -> None:
    """Stamp ``row`` with the date (``"date"``, minutes), print it as JSON and append it to
    the CSV ``path`` (:func:`append_rows`)."""
    row = {**row, "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(row), flush=True)
    append_rows(path, [row], fields=fields)


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1)


def cpu_model() -> str:
    """The CPU's model name, from ``/proc/cpuinfo`` (``"unknown"`` where that is absent)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine_info() -> dict[str, str]:
    """CPU model, cores, RAM, OS and the versions of the packages that matter."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = cpu_model()
    mem_gb = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": mem_gb,
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    for pkg in [
        "scale-scvi",
        "scvi-tools",
        "torch",
        "lightning",
        "numpy",
        "scikit-learn",
        "scanpy",
        "leidenalg",
    ]:
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = "not installed"
    # Without a peer's venv on this machine, its pinned version is given (its rows were run
    # in a venv made by ensure_*_venv with that pin).
    absent = "pinned; venv absent when this report was written"
    info["original scale (own venv)"] = f"scale {ORIGINAL_VERSION} ({absent})"
    info["snapatac2 (own venv)"] = f"{SNAPATAC2_VERSION} ({absent})"
    if ORIGINAL_PYTHON.exists():
        out = subprocess.run(
            [
                str(ORIGINAL_PYTHON),
                "-c",
                "from importlib.metadata import version as v;"
                "print(v('scale'), v('torch'), v('numpy'))",
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode == 0:
            s, t, n = out.stdout.split()
            info["original scale (own venv)"] = f"scale {s}, torch {t}, numpy {n}"
    if SNAPATAC2_PYTHON.exists():
        out = subprocess.run(
            [
                str(SNAPATAC2_PYTHON),
                "-c",
                "from importlib.metadata import version as v;print(v('snapatac2'))",
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode == 0:
            info["snapatac2 (own venv)"] = out.stdout.strip()
    return info


def _ensure_venv(venv: Path, package: str, installs: list[list[str]]) -> bool:
    """Create ``venv`` and pip-install ``installs`` (one argument list each) unless ``package``
    is already importable there."""
    python = venv / "bin" / "python"
    if python.exists():
        ok = subprocess.run(
            [str(python), "-c", f"import importlib.metadata as m; m.version({package!r})"],
            capture_output=True,
        )
        if ok.returncode == 0:
            return True
    steps = [[sys.executable, "-m", "venv", str(venv)]]
    steps += [[str(python), "-m", "pip", "install", "-q", *args] for args in installs]
    for cmd in steps:
        if subprocess.run(cmd).returncode != 0:
            print(f"Could not install {package}:", " ".join(cmd), file=sys.stderr)
            return False
    return True


def ensure_original_venv() -> bool:
    """Create ``benchmarks/.venv-scale`` with ``torch==2.13.0`` first, then ``scale==1.1.2``."""
    return _ensure_venv(
        ORIGINAL_VENV, "scale", [["torch==2.13.0"], [f"scale=={ORIGINAL_VERSION}"]]
    )


def ensure_snapatac2_venv() -> bool:
    """Create ``benchmarks/.venv-snapatac2`` with ``snapatac2==2.9.0`` (several minutes: one
    of its dependencies, macs3, is built from source)."""
    return _ensure_venv(SNAPATAC2_VENV, "snapatac2", [[f"snapatac2=={SNAPATAC2_VERSION}"]])


def tutorial_reference_and_query(seed: int, peak_effect: float = 0.0, dataset: str = "cell_lines"):
    """The reference-mapping tutorial's split of the cell lines (or of another shared set,
    ``dataset``), ``(reference, query)``.

    The cells are split at random into a "deep" and a "shallow" batch (``obs["batch"]``);
    the shallow cells' reads are kept with probability 0.3, or with ``peak_effect`` S > 0
    with a probability of each peak's own, ``0.3 x exp(N(0, S))`` capped at 1 (a peak-wise
    capture difference on top of the depth). The counts are in ``layers["counts"]``.
    """
    import pandas as pd

    import scale_scvi

    adata = getattr(scale_scvi.datasets, dataset)()
    rng = np.random.default_rng(seed)
    adata.obs["batch"] = pd.Categorical(np.where(rng.random(adata.n_obs) < 0.5, "deep", "shallow"))
    keep = np.full(adata.n_vars, 0.3)
    if peak_effect:
        effect = np.random.default_rng(100 + seed).normal(0, peak_effect, adata.n_vars)
        keep = np.clip(0.3 * np.exp(effect), 0.0, 1.0)
    counts = sp.csr_matrix(adata.X, dtype=np.float32, copy=True)
    for i in np.flatnonzero(adata.obs["batch"] == "shallow"):
        row = slice(counts.indptr[i], counts.indptr[i + 1])
        counts.data[row] = rng.binomial(
            counts.data[row].astype(np.int64), keep[counts.indices[row]]
        )
    counts.eliminate_zeros()
    adata.layers["counts"] = counts
    reference = adata[adata.obs["batch"] == "deep"].copy()
    query = adata[adata.obs["batch"] == "shallow"].copy()
    for part in (reference, query):
        part.obs["batch"] = part.obs["batch"].cat.remove_unused_categories()
    return reference, query
