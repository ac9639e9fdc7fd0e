"""What query training does to reference mapping (the reference-mapping tutorial's split).

The cell lines' cells are split at random into a "deep" and a "shallow" batch (one split per
seed), the shallow one's reads kept with probability 0.3, or with ``--peak-effect S`` with a
probability of its own for each peak, ``0.3 x exp(N(0, S))`` capped at 1 (a peak-wise capture
difference on top of the depth). A reference (``batch_key="batch"``, encoder input
``--n-lsi``) is trained on the deep cells once; the shallow cells are then mapped onto it with
``SCALE.load_query_data`` several times, each a fresh query model trained as one of
``--runs``: ``<scheme>:<epochs>`` with scheme ``adapted`` (scArches' scheme: the encoder's
columns of the query's batch train too, ``adapt_encoder=True``), ``reference`` (the
package's default: the encoder frozen) or ``encoder_only`` (scArches' scheme with the
decoder's query column frozen at zero), and epochs ``0`` (no training), a number, or
``default`` (``train()`` with no argument). Each run appends a row to
``results/query_training.csv``: the share of query cells whose type a 15-nearest-neighbour
vote of reference cells gets right, the ARI of the query cells' reference components, and
the query's held-out negative ELBO at the last epoch. One thread.

Usage (from the repository root)::

    SCALE_SCVI_DATA=../shared/data .venv/bin/python benchmarks/query_training.py --seed 0 \\
        --runs adapted:0 adapted:20 adapted:default reference:default
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from _common import record_row, tutorial_reference_and_query

RESULTS = Path(__file__).resolve().parent / "results" / "query_training.csv"
SCHEMES = ("adapted", "reference", "encoder_only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-lsi", default="null", help="JSON: 30, null (the peaks), ...")
    parser.add_argument("--peak-effect", type=float, default=0.0)
    parser.add_argument("--runs", nargs="+", default=["adapted:0", "reference:default"])
    args = parser.parse_args()
    runs = [run.split(":") for run in args.runs]
    if any(scheme not in SCHEMES for scheme, _ in runs):
        raise SystemExit(f"schemes: {SCHEMES}")
    n_lsi = json.loads(args.n_lsi)
    import scvi
    import torch
    from sklearn.metrics import adjusted_rand_score
    from sklearn.neighbors import KNeighborsClassifier

    from scale_scvi import SCALE

    torch.set_num_threads(1)
    scvi.settings.seed = args.seed
    reference, query = tutorial_reference_and_query(args.seed, args.peak_effect)
    SCALE.setup_anndata(reference, layer="counts", batch_key="batch")
    ref = SCALE(reference, n_lsi=n_lsi)
    ref.train(enable_progress_bar=False)
    torch.set_num_threads(1)  # the scoring (scikit-learn, scanpy) may change it
    knn = KNeighborsClassifier(n_neighbors=15).fit(
        ref.get_latent_representation(), reference.obs["cell_type"]
    )
    truth = query.obs["cell_type"].to_numpy()
    for scheme, epochs in runs:
        model = SCALE.load_query_data(query.copy(), ref, adapt_encoder=scheme != "reference")
        if scheme == "encoder_only":
            weight = model.module.decoder.output.fc_layers[0][0].weight
            with torch.no_grad():
                weight[:, -1] = 0.0
            weight.requires_grad_(False)
        start = time.perf_counter()
        if epochs == "0":
            model.is_trained_ = True  # mapped, not trained
        else:
            kwargs = {} if epochs == "default" else {"max_epochs": int(epochs)}
            model.train(enable_progress_bar=False, **kwargs)
            torch.set_num_threads(1)
        seconds = time.perf_counter() - start
        history = model.history if epochs != "0" else {}
        loss = history.get("elbo_validation")
        row = {
            "seed": args.seed,
            "n_lsi": "peaks" if n_lsi is None else n_lsi,
            "peak_effect": args.peak_effect,
            "scheme": scheme,
            "epochs": epochs if epochs in ("0", "default") else int(epochs),
            "epochs_run": 0 if loss is None else len(loss),
            "transfer_accuracy": round(
                float((knn.predict(model.get_latent_representation()) == truth).mean()), 3
            ),
            "query_component_ari": round(
                adjusted_rand_score(truth, model.get_cluster_assignments()), 3
            ),
            "heldout_neg_elbo_last": "" if loss is None else round(float(loss.iloc[-1, 0]), 1),
            "train_s": round(seconds, 1),
        }
        record_row(RESULTS, row)


if __name__ == "__main__":
    main()
