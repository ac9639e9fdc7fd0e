"""Seconds per epoch of this SCALE and the original SCALE, side by side, on the forebrain set.

Same data (1,043 cells x all 140,102 peaks), same architecture (P -> 1024 -> 128 -> 10, no
batch norm, linear decoder) and the same minibatch size (64, the original's default). The two
run one after the other in their own processes, alternating, ``--repeats`` times; each time the
original trains ``--orig-iters`` minibatches of one epoch (per-epoch time = per-minibatch time x 16
(its GMM initialization is skipped; it does not change the cost of a minibatch)) and this SCALE
``--epochs`` epochs (median epoch reported; the epoch holding the GMM initialization is
not the median). Each repeat runs every ``--threads`` setting (torch threads of every
process; 0 for torch's default, all cores), and speed-ups compare runs with the same
setting. Writes ``results/speed.csv``.

Usage::

    .venv/bin/python benchmarks/run_speed.py --repeats 2 --threads 0 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from _common import (
    MAIN_PYTHON,
    ORIGINAL_PYTHON,
    RESULTS,
    WORK,
    ensure_original_venv,
    prepare_dataset,
    read_json,
    run_child,
)

CSV = RESULTS / "speed.csv"


def _row(method: str, rep: int, threads: int, info: dict, usage: dict, timed: str) -> dict:
    return {
        "method": method,
        "threads": str(threads) if threads else "all",
        "repeat": rep,
        "s_per_epoch": info["s_per_epoch"],
        "cpu_s_per_epoch": info["cpu_s_per_epoch"],
        "timed": timed,
        "peak_rss_mb": usage["peak_rss_mb"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="forebrain")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--orig-iters", type=int, default=6, help="original: minibatches timed (per-epoch = x16)"
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[0, 1],
        help="torch threads of every process, one setting after the other (0: torch's default)",
    )
    args = parser.parse_args()
    data = prepare_dataset(args.dataset)
    if data is None:
        sys.exit(f"{args.dataset} is not in the shared data folder; nothing to time.")
    have_original = ensure_original_venv()
    rows = []
    variants = [
        ("this SCALE (dense minibatches)", ["--minibatches", "dense"]),
        ("this SCALE (load_sparse_tensor=True)", ["--minibatches", "sparse"]),
    ]
    for rep in range(args.repeats):
        for threads in args.threads:
            thread_args = ["--threads", str(threads)] if threads else []
            if have_original:
                out = str(WORK / f"speed_original_t{threads}_{rep}")
                cmd = [str(ORIGINAL_PYTHON), "benchmarks/original_scale.py", "--data", str(data)]
                cmd += ["--out", out, "--batch-size", str(args.batch_size), "--no-outputs"]
                cmd += ["--timed-iters", str(args.orig_iters), *thread_args]
                usage = run_child(cmd, WORK / "logs" / f"speed_original_t{threads}_{rep}.log")
                if usage["returncode"] == 0:
                    info = read_json(Path(out + ".json"))
                    timed = f"{info['n_iter']} of {info['iters_per_epoch']} minibatches"
                    rows.append(_row("original SCALE 1.1.2", rep, threads, info, usage, timed))
                    print(rows[-1], flush=True)
            for name, extra in variants:
                tag = f"{'sparse' if extra else 'dense'}_t{threads}"
                out = str(WORK / f"speed_scale_{tag}_{rep}")
                cmd = [MAIN_PYTHON, "benchmarks/methods.py", "--method", "scale_k"]
                cmd += ["--data", str(data), "--out", out, "--batch-size", str(args.batch_size)]
                cmd += ["--no-outputs", "--max-epochs", str(args.epochs), "--original-encoder"]
                cmd += ["--time-epochs"]
                cmd += [*extra, *thread_args]
                usage = run_child(cmd, WORK / "logs" / f"speed_scale_{tag}_{rep}.log")
                if usage["returncode"] != 0:
                    print(f"{name} failed; see work/logs", file=sys.stderr)
                    continue
                info = read_json(Path(out + ".json"))
                timed = f"median of {info['n_epochs']} epochs"
                rows.append(_row(name, rep, threads, info, usage, timed))
                print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    df["dataset"] = args.dataset
    df["batch_size"] = args.batch_size
    for col, name in (("s_per_epoch", "speedup_wall"), ("cpu_s_per_epoch", "speedup_cpu")):
        df[name] = np.nan
        for _, same in df.groupby("threads"):
            is_orig = same.method.str.startswith("original")
            if is_orig.any():
                df.loc[same.index, name] = same.loc[is_orig, col].median() / same[col]
    RESULTS.mkdir(parents=True, exist_ok=True)
    df.to_csv(CSV, index=False)
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
