"""Multimodal SCALE on the sci-CAR mouse kidney pair (paired RNA + ATAC, 4,753 cells, 14 types).

Compared in one run, on the same cells and split:

- ``scale_joint``: SCALE on the MuData with its defaults (the mixture of the two experts and
  their product with learned weights, the held-out check of the experts with a new start
  when it leaves one out, shared GMM prior);
- ``scale_atac``: SCALE on the ATAC side alone (the single-modality model);
- ``scale_rna``: SCALE on the RNA side alone (GMM-prior VAE with a negative binomial);
- ``multivi``: scvi-tools' MULTIVI with its default architecture and training.

Every model is trained on the same 90% of the cells; SCALE gets the other 10% as its
validation cells (what ``train()``'s default split holds out). Clustering (k-means with the true
k = 14, ``n_init=20``, on the latent means; and argmax of SCALE's cluster probabilities) is
scored on all cells by ARI and NMI against ``obs["cell_type"]``. Cross-modal prediction is
scored on the 10% held-out cells: their RNA is predicted from their ATAC alone (the ATAC
expert's mean, decoded) and compared with the observed normalized expression
(``layers["lognorm"]``), and their binarized ATAC is predicted from their RNA alone; the
table gives the median per-feature Pearson correlation across cells (features seen in at
least 5 held-out cells) and the median per-cell correlation across those features.
``--baselines`` scores the same for predictions that read neither modality of the held-out
cell: the mean profile of the training cells of its true type (the per-cluster mean) and of
all training cells.

How much each modality can tell about the cell types at all is measured by ``--probe``: a
supervised multinomial logistic regression on each modality alone (binarized peaks; the
stored log-normalized expression), balanced accuracy in 5-fold stratified cross-validation.

Usage::

    python benchmarks/multiome.py --seeds 0 1 2
    python benchmarks/multiome.py --seeds 0 --variants joint_atac5 --no-multivi
    python benchmarks/multiome.py --probe
    python benchmarks/multiome.py --seeds 0 1 2 3 --variants --no-multivi --baselines

Writes ``benchmarks/results/multiome.csv`` (``--out`` to change) and prints a summary.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

RESULTS = Path(__file__).resolve().parent / "results"
N_TYPES = 14

# SCALE variants: name -> (registered modalities, model kwargs, train kwargs)
MOE = {"posterior": "moe", "mixture_weights": "equal"}
LAYER_NORM = {"use_batch_norm": "none", "use_layer_norm": "encoder"}
VARIANTS: dict[str, tuple[tuple[str, ...], dict, dict]] = {
    # the defaults (the joint model's: posterior="mopoe", mixture_weights="learned")
    "scale_joint": (("atac", "rna"), {}, {}),
    "scale_atac": (("atac",), {}, {}),
    "scale_rna": (("rna",), {}, {}),
    # the mixture of the two experts with equal weights (the joint default before MoPoE with
    # learned weights) and variations of it
    "joint_moe_equal": (("atac", "rna"), MOE, {}),
    "joint_atac5": (("atac", "rna"), {**MOE, "likelihood_scale": {"atac": 5.0}}, {}),
    "joint_atac0.2": (("atac", "rna"), {**MOE, "likelihood_scale": {"atac": 0.2}}, {}),
    "joint_iwae": (("atac", "rna"), {**MOE, "objective": "iwae", "n_particles": 4}, {}),
    "joint_dreg": (("atac", "rna"), {**MOE, "objective": "dreg", "n_particles": 4}, {}),
    "joint_k20": (("atac", "rna"), {**MOE, "n_centroids": 20}, {}),
    "joint_ep100": (("atac", "rna"), MOE, {"max_epochs": 100}),
    "rna_ep100": (("rna",), {}, {"max_epochs": 100}),
    "joint_bn": (("atac", "rna"), {**MOE, "use_batch_norm": "encoder"}, {}),
    "rna_bn": (("rna",), {"use_batch_norm": "encoder"}, {}),
    "joint_atacdrop0.5": (("atac", "rna"), {**MOE, "input_dropout": {"atac": 0.5}}, {}),
    "joint_mopoe": (("atac", "rna"), {**MOE, "posterior": "mopoe"}, {}),
    "joint_mopoe_ep100": (("atac", "rna"), {**MOE, "posterior": "mopoe"}, {"max_epochs": 100}),
    "joint_mopoe_bn": (
        ("atac", "rna"),
        {**MOE, "posterior": "mopoe", "use_batch_norm": "encoder"},
        {},
    ),
    "joint_learned": (("atac", "rna"), {**MOE, "mixture_weights": "learned"}, {}),
    "joint_mopoe_learned": (
        ("atac", "rna"),
        {"posterior": "mopoe", "mixture_weights": "learned"},
        {},
    ),
    # the default with the ATAC log-likelihood weighted down
    "joint_atac0.01": (("atac", "rna"), {"likelihood_scale": {"atac": 0.01}}, {}),
    # every expert kept: the joint default until 2026-12-05 (rows made before then were
    # named scale_joint)
    "joint_all_experts": (("atac", "rna"), {"select_experts": False}, {}),
    # the default with the ATAC expert off from the first step (what the held-out check
    # decides on this pair): the ATAC likelihood decoded from the RNA expert's latent,
    # without moving it (see EXPERTS_OFF)
    "joint_atac_expert_off": (("atac", "rna"), {}, {}),
    # the same, and the RNA alone, without gradient clipping (the clipping is on the norm of
    # every gradient, the ATAC decoder's included)
    "joint_atac_expert_off_noclip": (("atac", "rna"), {}, {"gradient_clip_val": None}),
    "rna_noclip": (("rna",), {}, {"gradient_clip_val": None}),
    # the ATAC expert off from the start, and the RNA side started at the weights an RNA-only
    # model of the same seed starts at (see SAME_START_AS_RNA)
    "joint_atac_expert_off_rna_start": (("atac", "rna"), {}, {}),
    # the ATAC expert off from the start and its likelihood weighted down to nothing
    "joint_atac_expert_off_scale1e-6": (("atac", "rna"), {"likelihood_scale": {"atac": 1e-6}}, {}),
    # the defaults with the encoders' layer norm instead of batch norm (the ATAC-only model's
    # default since 2026-12-05)
    "scale_joint_ln": (("atac", "rna"), LAYER_NORM, {}),
    "scale_rna_ln": (("rna",), LAYER_NORM, {}),
}
# Joint variants made with the held-out check of the experts and its new start (the default
# since 2026-12-05); every other joint variant keeps every expert, as it did when measured.
# (The rows `joint_select_experts_no_restart` are the check without the new start, by the
# code before that date: the expert left out at the end of the warm-up, training continued.)
CHECKED = {"scale_joint", "scale_joint_ln"}
# Variants whose posterior leaves these modalities' experts out from the start.
EXPERTS_OFF = {name: ("atac",) for name in VARIANTS if name.startswith("joint_atac_expert_off")}
# Variants whose RNA encoder, decoder, dispersion and prior start where `scale_rna`'s do.
SAME_START_AS_RNA = {"joint_atac_expert_off_rna_start"}
DEFAULT_VARIANTS = ("scale_joint", "scale_atac", "scale_rna")


def load_pair():
    """The two sides of sci-CAR kidney as AnnData, checked to hold the same cells."""
    from scale_scvi.data import SCICAR_ATAC, SCICAR_RNA, shared_data_path

    paths = [shared_data_path(SCICAR_ATAC), shared_data_path(SCICAR_RNA)]
    if None in paths:
        raise SystemExit("sci-CAR data not found: set SCALE_SCVI_DATA to the labeled data folder.")
    atac, rna = (ad.read_h5ad(p) for p in paths)
    if not atac.obs_names.equals(rna.obs_names):
        raise SystemExit("The ATAC and RNA files do not hold the same cells in the same order.")
    return atac, rna


def make_mudata(atac: ad.AnnData, rna: ad.AnnData, rna_zero: np.ndarray | None = None):
    """A MuData of both sides; ``rna_zero`` cells get an all-zero RNA row (held out)."""
    from mudata import MuData

    rna_x = sp.csr_matrix(rna.X, dtype=np.float32)
    if rna_zero is not None and rna_zero.any():
        keep = sp.diags((~rna_zero).astype(np.float32))
        rna_x = sp.csr_matrix(keep @ rna_x)
        rna_x.eliminate_zeros()
    mods = {
        "rna": ad.AnnData(rna_x, obs=pd.DataFrame(index=rna.obs_names), var=rna.var[[]]),
        "atac": ad.AnnData(
            sp.csr_matrix(atac.X, dtype=np.float32),
            obs=pd.DataFrame(index=atac.obs_names),
            var=atac.var[[]],
        ),
    }
    return MuData(mods)


def copy_rna_side(source, target) -> None:
    """Copy the RNA encoder, decoder and dispersion and the prior of module ``source``
    into module ``target`` (an RNA-only model's start into a joint model)."""
    for part in ("encoders", "decoders"):
        getattr(target, part)["rna"].load_state_dict(getattr(source, part)["rna"].state_dict())
    target.px_r.data.copy_(source.px_r.data)
    target.prior.load_state_dict(source.prior.state_dict())


def cluster_metrics(latent: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
    pred = KMeans(n_clusters=N_TYPES, n_init=20, random_state=seed).fit_predict(latent)
    return {
        "ari_kmeans": adjusted_rand_score(labels, pred),
        "nmi_kmeans": normalized_mutual_info_score(labels, pred),
    }


def argmax_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    pred = probs.argmax(1)
    return {
        "ari_argmax": adjusted_rand_score(labels, pred),
        "nmi_argmax": normalized_mutual_info_score(labels, pred),
    }


def _pearson(p: np.ndarray, o: np.ndarray, axis: int) -> np.ndarray:
    """Pearson correlation of ``p`` and ``o`` along ``axis`` (NaN where one is constant)."""
    p = p - p.mean(axis, keepdims=True)
    o = o - o.mean(axis, keepdims=True)
    denom = np.sqrt((p**2).sum(axis) * (o**2).sum(axis))
    return np.where(denom > 0, (p * o).sum(axis) / np.where(denom > 0, denom, 1.0), np.nan)


def prediction_scores(
    pred: np.ndarray, observed: np.ndarray, min_cells: int = 5
) -> tuple[float, float]:
    """Median per-feature and median per-cell Pearson correlation of a prediction.

    Over the features observed (non-zero) in >= ``min_cells`` of the cells: per feature across
    cells (does the prediction rank cells right?), and per cell across features (does it get
    the cell's profile right? High for any prediction near the average profile).
    """
    seen = (observed > 0).sum(0) >= min_cells
    p, o = pred[:, seen], observed[:, seen]
    return float(np.nanmedian(_pearson(p, o, 0))), float(np.nanmedian(_pearson(p, o, 1)))


def per_gene_correlation(pred: np.ndarray, observed: np.ndarray, min_cells: int = 5) -> float:
    """Median over genes (expressed in >= ``min_cells`` cells) of the Pearson correlation."""
    return prediction_scores(np.log1p(1e4 * pred), observed, min_cells)[0]


def group_mean_prediction(
    train: np.ndarray, train_groups: np.ndarray, test_groups: np.ndarray
) -> np.ndarray:
    """Each test cell predicted by the mean profile of the training cells of its group."""
    means = {g: train[train_groups == g].mean(0) for g in np.unique(train_groups)}
    overall = train.mean(0)
    return np.stack([means.get(g, overall) for g in test_groups])


def baseline_rows(atac_bin, lognorm, train_idx, test_idx, labels) -> list[dict]:
    """Cross-modal baselines that look at neither modality of the held-out cell.

    ``celltype_mean``: the mean profile of the training cells of the held-out cell's true
    type (the per-cluster mean, with the clusters known); ``global_mean``: the mean of all
    training cells (per-feature correlation undefined: it is the same for every cell).
    """
    rows = []
    for name, groups in (("celltype_mean", labels), ("global_mean", np.zeros_like(labels))):
        row = {"method": f"baseline_{name}"}
        for mod, x in (("rna", lognorm), ("atac", atac_bin)):
            pred = group_mean_prediction(x[train_idx], groups[train_idx], groups[test_idx])
            feat, cell = prediction_scores(pred, x[test_idx])
            feat = feat if name != "global_mean" else float("nan")
            src = "atac" if mod == "rna" else "rna"
            row[f"{mod}_from_{src}_r"], row[f"{mod}_from_{src}_cell_r"] = feat, cell
        rows.append(row)
    return rows


def run_scale(name, atac, rna, train_idx, test_idx, labels, lognorm_test, seed, epochs, hidden):
    import scvi

    from scale_scvi import SCALE

    modalities, model_kwargs, train_kwargs = VARIANTS[name]
    model_kwargs = {"n_centroids": N_TYPES, **model_kwargs}
    if len(modalities) > 1 and name not in CHECKED:
        model_kwargs.setdefault("select_experts", False)
    if hidden:
        model_kwargs["n_hidden"] = tuple(hidden)
    train_kwargs = {"max_epochs": epochs, **train_kwargs} if epochs else dict(train_kwargs)
    scvi.settings.seed = seed
    if modalities == ("atac",):
        data = atac.copy()
        SCALE.setup_anndata(data)
    else:
        data = make_mudata(atac, rna)
        mapping = {f"{m}_layer": m for m in modalities}
        SCALE.setup_mudata(data, modalities=mapping)
    model = SCALE(data, **model_kwargs)
    if name in SAME_START_AS_RNA:
        scvi.settings.seed = seed
        rna_data = make_mudata(atac, rna)
        SCALE.setup_mudata(rna_data, modalities={"rna_layer": "rna"})
        copy_rna_side(SCALE(rna_data, **model_kwargs).module, model.module)
    for modality in EXPERTS_OFF.get(name, ()):
        model.module.expert_active[model.module.modalities.index(modality)] = False
    start = time.perf_counter()
    # The held-out tenth is the validation set, as train()'s default split would hold one
    # out: never trained on, and what the joint model's held-out check of its experts reads.
    model.train(
        datasplitter_kwargs={"external_indexing": [train_idx, test_idx, np.array([], dtype=int)]},
        enable_progress_bar=False,
        **train_kwargs,
    )
    seconds = time.perf_counter() - start
    row = {"epochs": model.history["elbo_train"].shape[0], "train_seconds": seconds}
    active = getattr(model.module, "expert_active", None)
    if active is not None and len(active) > 1:  # which experts the posterior kept
        row["experts"] = "+".join(m for m, on in zip(model.module.modalities, active) if on)
    logits = getattr(model.module, "component_logits", None)
    if logits is not None:  # learned mixture weights: (atac, rna[, product])
        weights = torch.softmax(logits.detach(), 0)
        row["mixture_weights"] = str([round(float(w), 3) for w in weights])
    row.update(cluster_metrics(model.get_latent_representation(), labels, seed))
    row.update(argmax_metrics(model.get_cluster_probabilities(), labels))
    if modalities == ("atac", "rna"):
        for mod in ("atac", "rna"):
            expert = model.get_latent_representation(modality=mod)
            row[f"ari_kmeans_{mod}_expert"] = cluster_metrics(expert, labels, seed)["ari_kmeans"]
            # the 10% of cells the model never saw: what the expert learned, not memorized
            m = cluster_metrics(expert[test_idx], labels[test_idx], seed)
            row[f"ari_kmeans_{mod}_expert_heldout"] = m["ari_kmeans"]
        # the experts' normalized product, each weighted by its certainty
        precision = model.get_latent_representation(joint_mean="precision")
        m = cluster_metrics(precision, labels, seed)
        row["ari_kmeans_precision"], row["nmi_kmeans_precision"] = m["ari_kmeans"], m["nmi_kmeans"]
        pred = model.get_normalized_expression(indices=test_idx, modality="atac")
        scores = prediction_scores(np.log1p(1e4 * pred), lognorm_test)
        row["rna_from_atac_r"], row["rna_from_atac_cell_r"] = scores
        pred = model.get_normalized_expression(indices=test_idx, modality="rna")
        row["rna_from_rna_r"] = per_gene_correlation(pred, lognorm_test)
        atac_test = np.asarray(atac.X[test_idx].toarray() > 0, dtype=np.float32)
        pred = model.get_normalized_accessibility(indices=test_idx, modality="rna")
        row["atac_from_rna_r"], row["atac_from_rna_cell_r"] = prediction_scores(pred, atac_test)
    elif modalities == ("rna",):
        pred = model.get_normalized_expression(indices=test_idx, modality="rna")
        row["rna_from_rna_r"] = per_gene_correlation(pred, lognorm_test)
    return row


def run_multivi(atac, rna, train_idx, test_idx, labels, lognorm_test, seed, epochs):
    import scvi

    scvi.settings.seed = seed
    mdata = make_mudata(atac, rna)
    scvi.model.MULTIVI.setup_mudata(mdata, modalities={"rna_layer": "rna", "atac_layer": "atac"})
    model = scvi.model.MULTIVI(mdata)
    start = time.perf_counter()
    kwargs = {"max_epochs": epochs} if epochs else {}
    # scvi-tools' defaults, except that training uses the same 90% of cells as SCALE (early
    # stopping validates on a tenth of those).
    rng = np.random.default_rng(seed)
    perm = rng.permutation(train_idx)
    n_val = len(perm) // 10
    model.train(
        datasplitter_kwargs={"external_indexing": [perm[n_val:], perm[:n_val], test_idx]},
        enable_progress_bar=False,
        **kwargs,
    )
    seconds = time.perf_counter() - start
    row = {"epochs": model.history["elbo_train"].shape[0], "train_seconds": seconds}
    row.update(cluster_metrics(model.get_latent_representation(), labels, seed))
    # RNA from ATAC alone: the held-out cells with their RNA zeroed (MultiVI reads an
    # all-zero modality as missing).
    held = np.zeros(atac.n_obs, dtype=bool)
    held[test_idx] = True
    masked = make_mudata(atac, rna, rna_zero=held)
    masked.obs["_indices"] = np.arange(masked.n_obs)  # what MULTIVI.setup_mudata adds
    pred = model.get_normalized_expression(masked, indices=test_idx, return_numpy=True)
    row["rna_from_atac_r"] = per_gene_correlation(np.asarray(pred), lognorm_test)
    pred = model.get_normalized_expression(mdata, indices=test_idx, return_numpy=True)
    row["rna_from_rna_r"] = per_gene_correlation(np.asarray(pred), lognorm_test)
    return row


def supervised_probe(atac, rna, labels, seed: int = 0) -> pd.DataFrame:
    """Balanced accuracy of a logistic regression on each modality alone (5-fold CV).

    An upper reference for what an unsupervised latent of that modality can separate: if
    the labels cannot be predicted from a modality with the labels in hand, its latent
    cannot add them to a joint model either.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    inputs = {
        "atac (binarized peaks)": sp.csr_matrix((atac.X > 0).astype(np.float32)),
        "rna (layers['lognorm'])": sp.csr_matrix(rna.layers["lognorm"], dtype=np.float32),
    }
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    rows = []
    for name, x in inputs.items():
        for c in (0.01, 0.1, 1.0):
            clf = LogisticRegression(C=c, max_iter=1000)
            acc = cross_val_score(clf, x, labels, cv=cv, scoring="balanced_accuracy")
            rows.append(
                {
                    "modality": name,
                    "C": c,
                    "balanced_accuracy": acc.mean(),
                    "sd": acc.std(),
                    "chance": 1.0 / len(np.unique(labels)),
                }
            )
            print(rows[-1])
    return pd.DataFrame(rows)


TABLE_COLUMNS = {
    "ari_kmeans": "ARI k-means",
    "ari_kmeans_precision": "ARI k-means, precision-weighted joint",
    "nmi_kmeans": "NMI k-means",
    "ari_argmax": "ARI argmax",
    "ari_kmeans_atac_expert": "ATAC expert ARI",
    "ari_kmeans_rna_expert": "RNA expert ARI",
    "ari_kmeans_atac_expert_heldout": "ATAC expert ARI, held-out cells",
    "ari_kmeans_rna_expert_heldout": "RNA expert ARI, held-out cells",
    "rna_from_atac_r": "RNA from ATAC (r per gene)",
    "rna_from_atac_cell_r": "RNA from ATAC (r per cell)",
    "atac_from_rna_r": "ATAC from RNA (r per peak)",
    "atac_from_rna_cell_r": "ATAC from RNA (r per cell)",
    "train_seconds": "train s",
}


def markdown_table(table: pd.DataFrame) -> str:
    """One row per method and seed, then the mean over seeds of each method."""
    cols = [c for c in TABLE_COLUMNS if c in table.columns]
    lines = [
        "| model | seed | epochs | " + " | ".join(TABLE_COLUMNS[c] for c in cols) + " |",
        "|---" * (len(cols) + 3) + "|",
    ]

    def fmt(v, col):
        if pd.isna(v):
            return "–"
        return f"{v:.0f}" if col == "train_seconds" else f"{v:.3f}"

    for _, row in table.sort_values(["method", "seed"], kind="stable").iterrows():
        cells = " | ".join(fmt(row[c], c) for c in cols)
        epochs = "–" if pd.isna(row["epochs"]) else f"{row['epochs']:.0f}"
        lines.append(f"| {row['method']} | {row['seed']} | {epochs} | {cells} |")
    means = table.groupby("method", sort=True)[cols].mean()
    n_seeds = table.groupby("method", sort=True)["seed"].nunique()
    for method, row in means.iterrows():
        cells = " | ".join(fmt(row[c], c) for c in cols)
        lines.append(f"| **{method}, mean** | {n_seeds[method]} seeds | | {cells} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="*", default=list(DEFAULT_VARIANTS))
    parser.add_argument(
        "--n-hidden", type=int, nargs="+", default=None, help="SCALE encoders' hidden widths"
    )
    parser.add_argument("--no-multivi", action="store_true")
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="also score the cross-modal baselines (per-cell-type and global training means)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="override every model's epochs")
    parser.add_argument(
        "--multivi-epochs", type=int, default=None, help="cap MULTIVI's epochs (default 500)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "multiome.csv")
    parser.add_argument("--append", action="store_true", help="append to --out")
    parser.add_argument(
        "--probe",
        action="store_true",
        help="only the supervised probe of each modality (results/multiome_probe.csv)",
    )
    parser.add_argument(
        "--table",
        type=Path,
        nargs="+",
        default=None,
        help="print the markdown table of these result CSVs (merged) and exit",
    )
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(pd.concat([pd.read_csv(p) for p in args.table], ignore_index=True)))
        return
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    torch.set_num_threads(args.threads)

    atac, rna = load_pair()
    labels = atac.obs["cell_type"].astype(str).to_numpy()
    if args.probe:
        RESULTS.mkdir(parents=True, exist_ok=True)
        supervised_probe(atac, rna, labels).to_csv(RESULTS / "multiome_probe.csv", index=False)
        return
    lognorm = rna.layers["lognorm"]
    rows = []
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(atac.n_obs)
        n_test = atac.n_obs // 10
        test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
        lognorm_test = np.asarray(
            lognorm[test_idx].toarray() if sp.issparse(lognorm) else lognorm[test_idx]
        )
        if args.baselines:
            atac_bin = np.asarray(atac.X.toarray() > 0, dtype=np.float32)
            dense = np.asarray(lognorm.toarray() if sp.issparse(lognorm) else lognorm)
            for row in baseline_rows(atac_bin, dense, train_idx, test_idx, labels):
                rows.append({**row, "seed": seed, "n_hidden": "()"})
                print(rows[-1])
                _write(rows, args)
        jobs = [(v, run_scale) for v in args.variants]
        if not args.no_multivi:
            jobs.append(("multivi", run_multivi))
        if not jobs and not args.baselines:
            parser.error("nothing to run: give --variants or leave out --no-multivi")
        for name, fn in jobs:
            args_ = (atac, rna, train_idx, test_idx, labels, lognorm_test, seed, args.epochs)
            if fn is run_scale:
                row = fn(name, *args_, args.n_hidden)
            else:
                row = fn(*args_[:-1], args.multivi_epochs or args.epochs)
            hidden = args.n_hidden if fn is run_scale else None
            row = {"method": name, "seed": seed, "n_hidden": str(tuple(hidden or ())), **row}
            rows.append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            _write(rows, args)
    table = pd.DataFrame(rows)
    metrics = [c for c in table.select_dtypes("number").columns if c not in ("seed",)]
    print(table.groupby("method", sort=False)[metrics].mean().round(3).to_string())


def _write(rows, args):
    table = pd.DataFrame(rows)
    table["machine"] = f"{platform.processor() or platform.machine()}, {args.threads} threads"
    table["torch_threads"] = args.threads
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and args.out.exists():
        table = pd.concat([pd.read_csv(args.out), table], ignore_index=True)
        table = table.drop_duplicates(subset=["method", "seed"], keep="last")
    table.to_csv(args.out, index=False)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
