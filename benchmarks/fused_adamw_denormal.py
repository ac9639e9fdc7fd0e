"""Time one FusedAdamW step on a column-major 1024 x 20,000 weight, with normal moments and
with subnormal ones (flush-denormal off and on), and torch's AdamW(fused=True) beside it.

    OMP_NUM_THREADS=1 python benchmarks/fused_adamw_denormal.py
"""

from __future__ import annotations

import platform
import time

import torch

from scale_scvi.train import FusedAdamW, flush_denormal

N_OUT, N_IN, REPEATS = 1024, 20_000, 20


def _weight() -> torch.nn.Parameter:
    w = torch.randn(N_OUT, N_IN)
    return torch.nn.Parameter(w.t().contiguous().t())  # column-major, as the first layer


def _time_step(opt: torch.optim.Optimizer, w: torch.nn.Parameter) -> float:
    w.grad = torch.zeros_like(w)  # a peak absent from the minibatch: zero gradient
    opt.step()  # warm-up
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _with_moments(opt: torch.optim.Optimizer, w: torch.nn.Parameter, value: float) -> None:
    w.grad = torch.zeros_like(w)
    opt.step()
    state = opt.state[w]
    state["exp_avg"].fill_(value)
    state["exp_avg_sq"].fill_(value * value if value > 1e-19 else value)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    subnormal = torch.finfo(torch.float32).tiny / 4  # ~2.9e-39
    rows = {}
    for name, value in (("normal moments", 1e-3), ("subnormal moments", subnormal)):
        for flush in (False, True):
            w = _weight()
            opt = FusedAdamW([w], lr=1e-3)
            with flush_denormal(flush):
                _with_moments(opt, w, value)
                rows[f"FusedAdamW, {name}, flush-denormal {'on' if flush else 'off'}"] = (
                    _time_step(opt, w)
                )
    w = _weight()
    opt = torch.optim.AdamW([w], lr=1e-3, fused=True)
    _with_moments(opt, w, 1e-3)
    rows["torch.optim.AdamW(fused=True), normal moments"] = _time_step(opt, w)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    print(f"# weight {N_OUT} x {N_IN} column-major; median of {REPEATS} steps")
    for name, seconds in rows.items():
        print(f"{name}: {seconds:.4f} s")


if __name__ == "__main__":
    main()
