"""Write ``benchmarks/RESULTS.md`` and ``results/ari_vs_time.png`` from ``results/*.csv``.

Only the part between ``<!-- section:main -->`` and ``<!-- /section:main -->`` is this
script's; every other ``<!-- section:NAME -->`` ... ``<!-- /section:NAME -->`` block already
in RESULTS.md is kept verbatim, in its order, after it.

Usage::

    .venv/bin/python benchmarks/report.py
"""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
import pandas as pd
from _common import BENCH_DIR, RESULTS, machine_info

RESULTS_MD = BENCH_DIR / "RESULTS.md"
MINE = "main"
SECTION = re.compile(r"<!-- section:(?P<name>[\w.-]+) -->.*?<!-- /section:(?P=name) -->", re.S)
LABELS = {
    "scale": "SCALE (this package)",
    "scale_k": "SCALE, n_centroids = true k",
    "original": "original SCALE 1.1.2",
    "peakvi": "PeakVI",
    "lsi": "LSI (TF-IDF + SVD)",
    "snapatac2": "SnapATAC2 spectral",
}
# the targets of the quality table on the matrices as shipped
LEIDEN_PEERS = ["snapatac2", "lsi", "peakvi"]
KMEANS_PEERS = ["snapatac2", "lsi", "peakvi", "original"]
NOTES_FILE = BENCH_DIR / "NOTES.md"


def other_sections(text: str) -> list[str]:
    """The marked sections of other authors, verbatim."""
    return [m.group(0) for m in SECTION.finditer(text) if m.group("name") != MINE]


def _fmt(x, digits=3):
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _mean_sd(g: pd.DataFrame, col: str, digits: int = 3) -> str:
    v = g[col].astype(float)
    if v.isna().all():
        return "-"
    if len(v.dropna()) > 1:
        return f"{v.mean():.{digits}f} ± {v.std(ddof=0):.{digits}f}"
    return f"{v.mean():.{digits}f}"


def _ordered(df: pd.DataFrame):
    order = {m: i for i, m in enumerate(LABELS)}
    return sorted(
        df.groupby(["dataset", "method"]), key=lambda kv: (kv[0][0], order.get(kv[0][1], 9))
    )


def _with_in_targets(df: pd.DataFrame) -> pd.DataFrame:
    """``in_targets`` as booleans; rows written before the column existed count as in."""
    in_targets = df["in_targets"] if "in_targets" in df else pd.Series(True, index=df.index)
    return df.assign(in_targets=[True if pd.isna(v) else bool(v) for v in in_targets])


def shipped_section(df: pd.DataFrame) -> list[str]:
    """The quality table on the matrices as shipped (``results/quality_shipped.csv``)."""
    df = _with_in_targets(df)
    threads = ", ".join(str(t) for t in sorted(df.threads.unique()))
    inputs = "; ".join(
        f"{d}: {g.input.iloc[0]} ({int(g.k_true.iloc[0])} types)" for d, g in df.groupby("dataset")
    )
    lines = [
        "## Clustering quality on the matrices as shipped",
        "",
        "`run_quality.py`: every method gets the matrix as it is in the shared data folder, "
        f"no peaks selected by hand ({inputs}). Each run is its own process with {threads} "
        "thread(s) (`OMP_NUM_THREADS`, `MKL_NUM_THREADS`, `RAYON_NUM_THREADS`, "
        "`torch.set_num_threads`), one after the other. Every embedding is scored the same "
        "way: *k-means* with the true number of types (`n_init=20`), and *Leiden* at "
        "scanpy's defaults (`sc.pp.neighbors(use_rep=...)`, `sc.tl.leiden`, resolution 1.0; "
        "the number of clusters it finds is given). *Own clusters*: "
        "`get_cluster_assignments()` for this SCALE (`SCALE(adata)` with no K for the first "
        "row, so the number of clusters is the model's), the argmax of `get_gamma` for the "
        "original. *train s*: the method's `train()` (or embedding) call alone, wall clock; "
        "*wall s*: the whole process (imports, data, training, inference); *load*: the "
        "machine's 1-minute load average during the run (2 cores; wall times stretch with "
        "it, CPU times much less). *peak RSS*: the process's own `VmHWM` (- for runs made "
        "before the runner read it: `ru_maxrss` of a child includes the runner's own size at "
        "the fork, and the earlier tables' peak RSS columns include it too). Mean ± sd over "
        "seeds (n).",
        "",
        "| dataset | method | n | ARI k-means | NMI k-means | ARI Leiden | NMI Leiden | "
        "Leiden clusters | ARI own clusters | NMI own clusters | own clusters | train s | "
        "train CPU s | epochs | wall s | peak RSS MB | settings |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (dataset, method), g in _ordered(df):
        lines.append(
            f"| {dataset} | {LABELS.get(method, method)} | {len(g)} | "
            f"{_mean_sd(g, 'ari_kmeans')} | {_mean_sd(g, 'nmi_kmeans')} | "
            f"{_mean_sd(g, 'ari_leiden')} | {_mean_sd(g, 'nmi_leiden')} | "
            f"{_mean_sd(g, 'n_leiden', 1)} | {_mean_sd(g, 'ari_own')} | "
            f"{_mean_sd(g, 'nmi_own')} | {_mean_sd(g, 'n_own', 1)} | "
            f"{_mean_sd(g, 'train_s', 0)} | {_mean_sd(g, 'train_cpu_s', 0)} | "
            f"{_fmt(float(g.n_epochs.mean()), 0)} | {_mean_sd(g, 'wall_s', 0)} | "
            f"{_fmt(float(g.peak_rss_mb.max()), 0)} | {g.settings.iloc[0]} |"
        )
    lines += [
        "",
        "Per seed:",
        "",
        "| dataset | method | seed | ARI k-means | ARI Leiden (clusters) | ARI own (clusters) | "
        "NMI k-means | NMI Leiden | NMI own | train s | train CPU s | epochs | load | run on |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(LABELS)}
    per_seed = df.assign(_o=df.method.map(order)).sort_values(["dataset", "_o", "seed"])
    for r in per_seed.itertuples():
        own = "-" if np.isnan(r.ari_own) else f"{r.ari_own:.3f} ({int(r.n_own)})"
        lines.append(
            f"| {r.dataset} | {LABELS.get(r.method, r.method)} | {r.seed} | "
            f"{_fmt(r.ari_kmeans)} | {r.ari_leiden:.3f} ({int(r.n_leiden)}) | {own} | "
            f"{_fmt(r.nmi_kmeans)} | {_fmt(r.nmi_leiden)} | {_fmt(r.nmi_own)} | "
            f"{r.train_s:.0f} | {_fmt(float(r.train_cpu_s), 0)} | {_fmt(float(r.n_epochs), 0)} "
            f"| {_fmt(float(getattr(r, 'load_avg', np.nan)), 1)} | {r.date} |"
        )
    excluded = df[~df.in_targets] if "in_targets" in df else df.iloc[:0]
    for (dataset, method), g in excluded.groupby(["dataset", "method"]):
        lines += [
            "",
            f"{LABELS.get(method, method)} on {dataset} is capped ({g.settings.iloc[0]}): its "
            "row gives its time per epoch, not its quality, and is left out of the targets' "
            "quality comparisons (see the notes above).",
        ]
    knn = df.leiden_knn.unique()
    if len(knn) > 1 or knn[0] != "scanpy default":
        lines += ["", "Neighbours for Leiden: " + ", ".join(sorted(knn)) + "."]
    lines += [
        "",
        *targets_section(df),
        "",
        "![ARI against training time](results/ari_vs_time.png)",
        "",
    ]
    return lines


def _target_line(
    seed: int,
    mine: float,
    name: str,
    best: float | None,
    best_of: str,
    lower_is_better: bool = False,
    unit: str = "",
) -> str:
    """``met`` or ``missed by`` how much, for one seed."""
    if best is None or np.isnan(mine):
        return f"  - seed {seed}: not measured ({best_of} missing)"
    diff = best - mine if lower_is_better else mine - best
    digits = 0 if unit else 3

    def f(x: float) -> str:
        return f"{x:.{digits}f}{unit}"

    verdict = "**met**" if diff >= 0 else f"**missed by {f(abs(diff))}**"
    return f"  - seed {seed}: {verdict}: {name} {f(mine)} against {best_of} {f(best)}"


# PeakVI's early stopping (patience 50) cannot end its default training before this epoch
PEAKVI_MIN_EPOCHS = 51


def _time_target(seed: int, m, peakvi: pd.DataFrame) -> str:
    """Target (3) for one seed: SCALE's default ``train()`` against PeakVI's default.

    ``peakvi``: PeakVI's rows on the dataset, all seeds. Its row at the same seed is the
    comparison; a row capped in epochs (``in_targets`` false), of any seed, only bounds its
    default's time from below: ``PEAKVI_MIN_EPOCHS`` times its seconds per epoch.
    """
    same = peakvi[(peakvi.seed == seed) & peakvi.in_targets]
    capped = peakvi[~peakvi.in_targets]
    if same.empty and capped.empty:
        return _target_line(seed, m.train_s, "SCALE", None, "PeakVI", True, " s")
    p = same.iloc[0] if len(same) else capped.iloc[0]
    if len(same):
        line = _target_line(seed, m.train_s, "SCALE", float(p.train_s), "PeakVI", True, " s")
        cpu = "met" if m.train_cpu_s <= p.train_cpu_s else "missed"
        return line + (
            f" ({m.n_epochs:.0f} against {p.n_epochs:.0f} epochs; in CPU time, which depends "
            f"less on the load, {cpu}: {m.train_cpu_s:.0f} against {p.train_cpu_s:.0f} s)"
        )
    cpu_per_epoch = p.train_cpu_s / p.n_epochs
    low, low_cpu = p.s_per_epoch * PEAKVI_MIN_EPOCHS, cpu_per_epoch * PEAKVI_MIN_EPOCHS
    verdict = "**met**" if m.train_s <= low else "**not decided**"
    return (
        f"  - seed {seed}: {verdict}: SCALE {m.train_s:.0f} s (CPU {m.train_cpu_s:.0f} s, "
        f"{m.n_epochs:.0f} epochs) against PeakVI's default, at least {low:.0f} s (CPU "
        f"{low_cpu:.0f} s): {PEAKVI_MIN_EPOCHS} epochs, the fewest its early stopping allows, "
        f"at the {p.s_per_epoch:.0f} s ({cpu_per_epoch:.0f} CPU-s) per epoch of a run "
        f"capped at {p.n_epochs:.0f} epochs (seed {p.seed})"
    )


def targets_section(df: pd.DataFrame) -> list[str]:
    """One statement per target of the quality table and seed: met, or missed by how much."""
    lines = [
        "### Targets, per dataset and seed",
        "",
        "Compared at the same seed. (1) this SCALE's own clusters with no K given >= the best "
        "Leiden (default resolution) on SnapATAC2, LSI and PeakVI; (2) k-means with the true k "
        "on this SCALE's latent (no K given to the model) >= the best k-means of SnapATAC2, "
        "LSI, PeakVI and the original SCALE (the same with `n_centroids` = true k in "
        "brackets); (3) the wall time of the default `train()` <= PeakVI's default `train()` "
        "(same data, same threads).",
    ]

    def best(sub: pd.DataFrame, methods: list[str], col: str) -> tuple[float | None, str, str]:
        have = sub[sub.method.isin(methods) & sub.in_targets].dropna(subset=[col])
        if have.empty:
            return None, "/".join(methods), ""
        r = have.loc[have[col].idxmax()]
        missing = [m for m in methods if m not in set(have.method)]
        name = LABELS.get(r.method, r.method)
        note = f"; not compared: {', '.join(LABELS.get(m, m) for m in missing)}" if missing else ""
        return float(r[col]), name, note

    df = _with_in_targets(df)
    for dataset, d in df.groupby("dataset"):
        lines += ["", f"**{dataset}**", ""]
        for title, key in (
            ("(1) own clusters, no K, vs the best peer's Leiden", "own"),
            ("(2) k-means on this SCALE's latent vs the best peer's k-means", "kmeans"),
            ("(3) default `train()` wall time vs PeakVI's", "time"),
        ):
            lines.append(f"- {title}:")
            for seed, sub in d.groupby("seed"):
                mine = sub[sub.method == "scale"]
                if mine.empty:
                    lines.append(f"  - seed {seed}: not measured (no row of this SCALE)")
                    continue
                m = mine.iloc[0]
                if key == "own":
                    b, who, note = best(sub, LEIDEN_PEERS, "ari_leiden")
                    own = f"own clusters ({m.n_own:.0f} for {m.k_true:.0f} types)"
                    line = _target_line(seed, m.ari_own, own, b, who + " Leiden") + note
                elif key == "kmeans":
                    b, who, note = best(sub, KMEANS_PEERS, "ari_kmeans")
                    line = _target_line(seed, m.ari_kmeans, "SCALE", b, who)
                    with_k = sub[sub.method == "scale_k"]
                    if len(with_k) and b is not None:
                        a = float(with_k.iloc[0].ari_kmeans)
                        line += f" [n_centroids = k: {a:.3f}, {a - b:+.3f}]"
                    line += note
                else:
                    line = _time_target(seed, m, d[d.method == "peakvi"])
                lines.append(line)
    return lines


def quality_section(df: pd.DataFrame) -> list[str]:
    lines = [
        "## Clustering quality, earlier input: peaks open in >= 2 % of the cells",
        "",
        "The table before the one above, kept for reference (`results/quality.csv`, last "
        "run 2026-12-02; the code and defaults of this SCALE have changed since). "
        "Every method gets the same binarized matrix, peaks open in at least 2 % of the cells "
        "(forebrain: 17,349 of 140,102 peaks; cell lines: 5,032 of 5,036), selected by hand "
        "for every method. "
        "k-means with the true number of types (`n_init=20`) on each method's latent "
        "(posterior means for the VAEs); *argmax* is the most probable mixture component "
        "(`get_cluster_probabilities().argmax(1)` here, `get_gamma` in the original). "
        "Mean ± sd over seeds (n = number of seeds). Wall time and peak RSS are those of the "
        "method's own process (data loading, training, inference).",
        "",
        "| dataset | method | n | ARI (k-means) | NMI (k-means) | ARI (argmax) | train s | "
        "s / epoch | CPU s (process) | epochs | peak RSS MB | settings |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(LABELS)}
    for (dataset, method), g in sorted(
        df.groupby(["dataset", "method"]), key=lambda kv: (kv[0][0], order.get(kv[0][1], 9))
    ):

        def ms(col, g=g):
            v = g[col].astype(float)
            if v.isna().all():
                return "-"
            return f"{v.mean():.3f} ± {v.std(ddof=0):.3f}" if len(v) > 1 else f"{v.mean():.3f}"

        lines.append(
            f"| {dataset} | {LABELS.get(method, method)} | {len(g)} | {ms('ari_kmeans')} | "
            f"{ms('nmi_kmeans')} | {ms('ari_argmax')} | {g.train_s.mean():.0f} | "
            f"{_fmt(float(g.s_per_epoch.mean()), 2)} | "
            f"{_fmt(float(g['cpu_s'].mean()) if 'cpu_s' in g else np.nan, 0)} | "
            f"{_fmt(float(g.n_epochs.mean()), 0)} | "
            f"{g.peak_rss_mb.max():.0f} | {g.settings.iloc[0]} |"
        )
    lines += ["", "Per seed:", "", "| dataset | method | seed | ARI | NMI | ARI (argmax) |"]
    lines += ["|---|---|---|---|---|---|"]
    for r in df.sort_values(["dataset", "method", "seed"]).itertuples():
        lines.append(
            f"| {r.dataset} | {LABELS.get(r.method, r.method)} | {r.seed} | "
            f"{_fmt(r.ari_kmeans)} | {_fmt(r.nmi_kmeans)} | {_fmt(r.ari_argmax)} |"
        )
    return [*lines, ""]


def plot_quality(df: pd.DataFrame) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(df.dataset.unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    markers = {"scale": "o", "scale_k": "P", "original": "s", "peakvi": "^", "lsi": "D"}
    markers["snapatac2"] = "v"
    for ax, dataset in zip(axes[0], datasets):
        sub = df[df.dataset == dataset]
        for method, g in sub.groupby("method"):
            ax.scatter(
                g.train_s.clip(lower=0.1),
                g.ari_kmeans,
                marker=markers.get(method, "x"),
                label=LABELS.get(method, method),
                s=50,
            )
        ax.set_xscale("log")
        ax.set_xlabel("training time, s (log)")
        ax.set_ylabel("ARI (k-means, true k)")
        ax.set_title(f"{dataset}, {sub.input.iloc[0]}" if "input" in sub else dataset)
        ax.set_ylim(-0.05, 1.0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "ari_vs_time.png", dpi=110)


def speed_section(df: pd.DataFrame) -> list[str]:
    lines = [
        "## Speed: seconds per epoch, this SCALE vs the original",
        "",
        "Forebrain, 1,043 cells x 140,102 peaks, encoder P -> 1024 -> 128 -> 10, linear "
        f"decoder, minibatch {int(df.batch_size.iloc[0])} for both, CPU, run side by side "
        "by `run_speed.py` (alternating processes).",
        "",
        "Wall seconds on a busy machine depend on what else runs; CPU seconds (all threads of "
        "the process during the timed epochs) much less, so both are given.",
        "",
        "Speed-ups are against the original's median with the same torch thread count "
        "(*all*: torch's default, every core).",
        "",
        "| method | threads | repeat | s / epoch (wall) | CPU s / epoch | timed | peak RSS MB | "
        "speed-up (wall) | speed-up (CPU) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if "threads" not in df:
        df = df.assign(threads="all")
    df = df.assign(threads=df.threads.astype(str))
    for r in df.sort_values(["threads", "repeat"], kind="stable").itertuples():
        lines.append(
            f"| {r.method} | {r.threads} | {r.repeat} | {r.s_per_epoch:.1f} | "
            f"{r.cpu_s_per_epoch:.1f} | {r.timed} | {r.peak_rss_mb:.0f} | "
            f"{r.speedup_wall:.1f}x | {r.speedup_cpu:.1f}x |"
        )
    return [*lines, ""]


def scaling_section(df: pd.DataFrame) -> list[str]:
    if "accelerator" not in df:
        df = df.assign(accelerator="cpu", device="cpu")
    gpu = df[df.accelerator != "cpu"]
    raw = df[(df.accelerator == "cpu") & (df.n_peaks != 50_000)]
    df = df[(df.accelerator == "cpu") & (df.n_peaks == 50_000)]
    lines = [
        "## Scale: synthetic data, 50,000 peaks, ~3 % dense",
        "",
        "`run_scaling.py`: one training epoch at the defaults (batch 32; the GMM "
        "initialization before it is not counted); latent = `get_latent_representation()`; "
        "imputation = `get_normalized_accessibility(threshold=0.5)` (CSR). Wall seconds and "
        "the process's CPU seconds (less sensitive to other jobs on a shared machine); peak "
        "RSS of the whole process and after each phase.",
        "",
        "| cells | density | input MB | s / epoch | CPU s / epoch | latent s (CPU) | "
        "imputation s (CPU) | RSS after data MB | after training | after latent | "
        "after imputation | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in df.itertuples():
        lines.append(
            f"| {r.n_cells:,} | {r.density:.3f} | {r.data_mb:.0f} | {r.train_s_per_epoch:.1f} | "
            f"{r.train_cpu_s_per_epoch:.1f} | {r.latent_s:.1f} ({r.latent_cpu_s:.1f}) | "
            f"{r.impute_s:.1f} ({r.impute_cpu_s:.1f}) | {r.rss_after_data_mb:.0f} | "
            f"{r.rss_after_train_mb:.0f} | {r.rss_after_latent_mb:.0f} | "
            f"{r.rss_after_impute_mb:.0f} | {r.peak_rss_mb:.0f} |"
        )
    if len(df) > 1:
        per_cell = df.train_cpu_s_per_epoch / df.n_cells * 1e3
        lines += [
            "",
            "Training CPU seconds per 1,000 cells: "
            + ", ".join(f"{n:,}: {v:.2f}" for n, v in zip(df.n_cells, per_cell)),
            "",
            "RSS after training minus the input matrix, MB: "
            + ", ".join(
                f"{n:,}: {v:.0f}"
                for n, v in zip(df.n_cells, df.rss_after_train_mb - df.data_mb, strict=True)
            )
            + " (the thresholded imputation's own output, a CSR matrix, grows with the cells).",
        ]
    if not raw.empty:
        lines += [
            "",
            "**A raw peak matrix through the default selection** (`run_scaling.py --peaks "
            "500000 --density 0.005`: peaks open in a type-specific pattern, about 2,800 of "
            "500,000 per cell; `setup_anndata` with its defaults, which read the peaks open in "
            ">= 1 % of the cells, at most 50,000 (the cap binds here); then, as above, one "
            "epoch at `n_centroids=10`,"
            " one thread). Setup = `setup_anndata` (which counts the cells of every peak, block"
            " by block) and `SCALE(adata)`; train s = the whole `train()` call, the mixture's "
            "fits included.",
            "",
            "| cells | peaks | density | input MB | setup s | peaks read | train s (1 epoch) | "
            "CPU s / epoch | latent s | imputation s | peak RSS MB | whole run s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r.n_cells:,} | {r.n_peaks:,} | {r.density:.4f} | {r.data_mb:.0f} | "
            f"{r.setup_time_s:.0f} | {r.n_peaks_read:,.0f} | {r.train_total_s:.0f} | "
            f"{r.train_cpu_s_per_epoch:.0f} | {r.latent_s:.0f} | {r.impute_s:.0f} | "
            f"{r.peak_rss_mb:.0f} | {r.wall_s:.0f} |"
            for r in raw.itertuples()
        ]
    if gpu.empty:
        lines += ["", "No GPU row: no GPU was available for these runs."]
    else:
        lines += [
            "",
            "On a GPU (`run_scaling.py --accelerator gpu`), same data and settings:",
            "",
            "| cells | device | s / epoch | latent s | imputation s | peak RSS MB |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r.n_cells:,} | {r.device} | {r.train_s_per_epoch:.1f} | {r.latent_s:.1f} | "
            f"{r.impute_s:.1f} | {r.peak_rss_mb:.0f} |"
            for r in gpu.itertuples()
        ]
    return [*lines, "", "![time and memory against cells](results/scaling.png)", ""]


def main() -> None:
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else ""
    keep = other_sections(text)
    info = machine_info()
    lines = [
        f"<!-- section:{MINE} -->",
        "# Benchmarks",
        "",
        "Produced by `make bench` (`benchmarks/run_quality.py`, `run_speed.py`, "
        "`run_scaling.py`, then this report, `report.py`). Raw numbers: `results/*.csv`.",
        "",
        f"Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        "**Machine.** " + ", ".join(f"{k}: {v}" for k, v in info.items()) + ".",
        "",
        "All timings were taken on a *shared* 2-core machine on which other jobs may have "
        "been running, so absolute seconds are noisy; ratios measured side by side are more "
        "meaningful than any single number. Every child process runs with "
        "`THP_MEM_ALLOC_ENABLE=1` (PyTorch's huge-page allocations, which scale_scvi turns on "
        "when imported first). No GPU was lent to these runs, so there are no GPU numbers "
        "here.",
        "",
    ]
    if NOTES_FILE.exists():
        lines += [NOTES_FILE.read_text().strip(), ""]
    if (RESULTS / "quality_shipped.csv").exists():
        q = pd.read_csv(RESULTS / "quality_shipped.csv")
        lines += shipped_section(q)
        plot_quality(q)
    if (RESULTS / "quality.csv").exists():
        lines += quality_section(pd.read_csv(RESULTS / "quality.csv"))
    if (RESULTS / "speed.csv").exists():
        lines += speed_section(pd.read_csv(RESULTS / "speed.csv"))
    if (RESULTS / "scaling.csv").exists():
        lines += scaling_section(pd.read_csv(RESULTS / "scaling.csv"))
    lines.append(f"<!-- /section:{MINE} -->")
    out = "\n".join(lines) + "\n"
    if keep:
        out += "\n" + "\n\n".join(keep) + "\n"
    RESULTS_MD.write_text(out)
    print(f"wrote {RESULTS_MD}")


if __name__ == "__main__":
    main()
