"""Reference mapping with an encoder of the peaks or of LSI coordinates (the tutorial's split).

The reference-mapping tutorial's set-up, one split per seed: the cell lines' cells (or
forebrain's, ``--dataset forebrain``) are split at random into a "deep" and a "shallow"
batch, the shallow one's reads kept with probability 0.3 (with ``--peak-effect S``, a
probability of each peak's own, ``0.3 x exp(N(0, S))`` capped at 1); a reference model
(``batch_key="batch"``) is trained on the deep cells with the encoder input ``--n-lsi``
(``null``: the peaks; ``auto``: the default), the shallow cells are mapped onto it with
``SCALE.load_query_data`` and trained (by default only the decoder's columns of their
batch; ``--adapt-encoder``: scArches' scheme), and one row goes to
``results/reference_mapping_encoder.csv``: the reference's own clusters (ARI), the share of
query cells whose type a 15-nearest-neighbour vote of reference cells gets right, and the ARI
of the query cells' reference components. One thread, one process per run.

Usage (from the repository root)::

    SCALE_SCVI_DATA=../shared/data .venv/bin/python benchmarks/reference_mapping_encoder.py \\
        --seed 0 --n-lsi null
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from _common import record_row, tutorial_reference_and_query

RESULTS = Path(__file__).resolve().parent / "results" / "reference_mapping_encoder.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", choices=("cell_lines", "forebrain"), default="cell_lines")
    parser.add_argument("--peak-effect", type=float, default=0.0)
    parser.add_argument(
        "--n-lsi", default="null", help='JSON: 30, null (the peaks), ..., or "auto"'
    )
    parser.add_argument("--adapt-encoder", action="store_true")
    parser.add_argument("--lsi", action="store_true", help="the row of LSI, no model")
    args = parser.parse_args()
    n_lsi = "auto" if args.n_lsi == "auto" else json.loads(args.n_lsi)
    import scvi
    import torch
    from sklearn.metrics import adjusted_rand_score
    from sklearn.neighbors import KNeighborsClassifier

    from scale_scvi import SCALE

    torch.set_num_threads(1)
    scvi.settings.seed = args.seed
    reference, query = tutorial_reference_and_query(args.seed, args.peak_effect, args.dataset)
    base = {"dataset": args.dataset, "peak_effect": args.peak_effect, "seed": args.seed}
    if args.lsi:
        from scale_scvi.module import LSIProjection

        lsi = LSIProjection(reference.n_vars, 30).fit(reference.layers["counts"])

        def coordinates(part):
            x = torch.as_tensor(part.layers["counts"].toarray() > 0, dtype=torch.float32)
            return lsi(x).numpy()

        knn = KNeighborsClassifier(n_neighbors=15).fit(
            coordinates(reference), reference.obs["cell_type"]
        )
        accuracy = (knn.predict(coordinates(query)) == query.obs["cell_type"]).mean()
        row = {**base, "n_lsi": "LSI alone", "transfer_accuracy": round(accuracy, 3)}
        record_row(RESULTS, row)
        return
    SCALE.setup_anndata(reference, layer="counts", batch_key="batch")
    ref = SCALE(reference, n_lsi=n_lsi)
    ref.train(enable_progress_bar=False)
    ref_ari = adjusted_rand_score(reference.obs["cell_type"], ref.get_cluster_assignments())
    query_model = SCALE.load_query_data(query, ref, adapt_encoder=args.adapt_encoder)
    torch.set_num_threads(1)  # the scoring above (scikit-learn) may have changed it
    query_model.train(enable_progress_bar=False)
    knn = KNeighborsClassifier(n_neighbors=15).fit(
        ref.get_latent_representation(), reference.obs["cell_type"]
    )
    predicted = knn.predict(query_model.get_latent_representation())
    row = {
        **base,
        "n_lsi": "peaks" if ref.module.n_lsi is None else ref.module.n_lsi,
        "query_encoder": "adapted" if args.adapt_encoder else "reference",
        "reference_ari_own": round(ref_ari, 3),
        "transfer_accuracy": round(float((predicted == query.obs["cell_type"]).mean()), 3),
        "query_component_ari": round(
            adjusted_rand_score(query.obs["cell_type"], query_model.get_cluster_assignments()),
            3,
        ),
    }
    record_row(RESULTS, row)


if __name__ == "__main__":
    main()
