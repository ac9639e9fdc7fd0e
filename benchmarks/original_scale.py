# ruff: noqa: E402, I001, NPY002, NPY201  (the NumPy 2 shim must run before `import scale`)
"""Run the original SCALE (``scale==1.1.2`` from PyPI) as a library, in its own venv.

The package imports under NumPy 2 only with ``np.warnings`` and ``np.Inf`` restored, and
its training loop calls ``torch.nn.utils.clip_grad_norm`` (the pre-1.0 name of
``clip_grad_norm_``); this wrapper restores those three names before importing it and
changes nothing else. It drives the package's own classes: ``scale.SCALE`` (P -> 1024 ->
128 -> 10 encoder, linear decoder), its ``init_gmm_params`` (GMM fitted on the untrained
encoder), its ``fit`` loop (Adam, weight decay 5e-4, gradient norm clipped at 10) and its
``SingleCellDataset`` (each cell densified from the sparse matrix as it is loaded).

Usage (from the repository root)::

    benchmarks/.venv-scale/bin/python benchmarks/original_scale.py \
        --data benchmarks/work/forebrain.npz --out benchmarks/work/orig --max-iter 3000
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch

np.warnings = warnings  # removed in NumPy 2; scale.dataset calls np.warnings.filterwarnings
np.Inf = np.inf  # removed in NumPy 2; scale.model.EarlyStopping uses it
if not hasattr(torch.nn.utils, "clip_grad_norm"):
    torch.nn.utils.clip_grad_norm = torch.nn.utils.clip_grad_norm_

import pandas as pd
from anndata import AnnData
from torch.utils.data import DataLoader

import scale
from scale.dataset import SingleCellDataset

from _common import load_matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="prefix of the output files")
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--n-centroids", type=int, default=None, help="default: true k")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-iter", type=int, default=30000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-outputs", action="store_true", help="timing only")
    parser.add_argument(
        "--timed-iters",
        type=int,
        default=None,
        help="timing only: train on the first N minibatches' cells (one short epoch, no GMM "
        "initialization) and report per-iteration and per-full-epoch times",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    X, labels = load_matrix(args.data)
    # the package's own preprocessing (scale.dataset.preprocessing_atac) sets counts above 1
    # to 1 before anything else; a binary matrix is unchanged
    X.data = np.minimum(X.data, 1.0)
    k = args.n_centroids or len(np.unique(labels))
    adata = AnnData(X)
    adata.obs["batch"] = pd.Categorical(["batch"] * X.shape[0])
    dataset = SingleCellDataset(adata)
    # num_workers=0 as for every other method here (the original asks for 4 on a 2-core box).
    trainloader = DataLoader(dataset, batch_size=args.batch_size, drop_last=True, shuffle=True)
    testloader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False)

    dims = [X.shape[1], 10, [1024, 128], []]
    model = scale.SCALE(dims, n_centroids=k)
    if args.timed_iters:
        iters_per_epoch = len(trainloader)
        subset = AnnData(X[: args.timed_iters * args.batch_size])
        subset.obs["batch"] = pd.Categorical(["batch"] * subset.n_obs)
        loader = DataLoader(
            SingleCellDataset(subset), batch_size=args.batch_size, drop_last=True, shuffle=True
        )
        t0, c0 = time.perf_counter(), time.process_time()
        model.fit(loader, lr=args.lr, weight_decay=5e-4, device="cpu", max_iter=len(loader))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        result = {
            "method": "original SCALE 1.1.2",
            "n_iter": len(loader),
            "batch_size": args.batch_size,
            "s_per_iter": wall / len(loader),
            "cpu_s_per_iter": cpu / len(loader),
            "iters_per_epoch": iters_per_epoch,
            "s_per_epoch": wall / len(loader) * iters_per_epoch,
            "cpu_s_per_epoch": cpu / len(loader) * iters_per_epoch,
        }
        with open(args.out + ".json", "w") as fh:
            json.dump(result, fh, indent=1)
        return
    t0 = time.perf_counter()
    model.init_gmm_params(testloader)
    t_init = time.perf_counter() - t0
    n_epochs = int(np.ceil(args.max_iter / len(trainloader)))
    t0, c0 = time.perf_counter(), time.process_time()
    model.fit(trainloader, lr=args.lr, weight_decay=5e-4, device="cpu", max_iter=args.max_iter)
    t_fit, c_fit = time.perf_counter() - t0, time.process_time() - c0
    result = {
        "method": "original SCALE 1.1.2",
        "n_iter": n_epochs * len(trainloader),
        "n_epochs": n_epochs,
        "batch_size": args.batch_size,
        "gmm_init_s": t_init,
        "train_s": t_fit,
        "s_per_epoch": t_fit / n_epochs,
        "cpu_s_per_epoch": c_fit / n_epochs,
        "train_cpu_s": c_fit,
    }
    if not args.no_outputs:
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            means, samples, gamma = [], [], []
            for x in testloader:
                z, mu, _ = model.encoder(x.float())
                means.append(mu)
                samples.append(z)
                gamma.append(model.get_gamma(z)[0])
        result["inference_s"] = time.perf_counter() - t0
        np.save(args.out + "_latent.npy", torch.cat(means).numpy())
        np.save(args.out + "_latent_sample.npy", torch.cat(samples).numpy())
        np.save(args.out + "_gmm.npy", torch.cat(gamma).numpy().argmax(1))
    with open(args.out + ".json", "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
