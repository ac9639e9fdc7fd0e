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
    "original": "original SCALE 1.1.2",
    "peakvi": "PeakVI",
    "lsi": "LSI (TF-IDF + SVD)",
}
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


def quality_section(df: pd.DataFrame) -> list[str]:
    lines = [
        "## Clustering quality",
        "",
        "Every method gets the same binarized matrix, peaks open in at least 2 % of the cells "
        "(forebrain: 17,349 of 140,102 peaks; cell lines: 5,032 of 5,036). "
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
    lines += ["", "![ARI against training time](results/ari_vs_time.png)", ""]
    return lines


def plot_quality(df: pd.DataFrame) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(df.dataset.unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    markers = {"scale": "o", "original": "s", "peakvi": "^", "lsi": "D"}
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
        ax.set_title(dataset)
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
    df = df[df.accelerator == "cpu"]
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
    if (RESULTS / "quality.csv").exists():
        q = pd.read_csv(RESULTS / "quality.csv")
        lines += quality_section(q)
        plot_quality(q)
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
