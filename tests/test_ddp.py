"""Multi-process training through Lightning's DDP strategy, on CPU, in a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).parent / "_ddp_train.py"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def _load_script():
    spec = importlib.util.spec_from_file_location("_ddp_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prior(out: Path, when: str, rank: int) -> dict[str, np.ndarray]:
    return dict(np.load(out / f"prior_{when}_rank{rank}.npz"))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_ddp_trains_on_two_processes(ddp_run: Path) -> None:
    result = json.loads((ddp_run / "result.json").read_text())
    assert result["world_size"] == 2
    assert result["epochs"] == 10
    assert np.isfinite(result["elbo"])


def test_gmm_fits_run_on_rank_0_and_are_broadcast(ddp_run: Path) -> None:
    fits = (ddp_run / "gmm_fits_rank0.txt").read_text().split()
    # at the initialization and when training ends, on rank 0 only
    assert fits == ["fit", "fit"], "the GMM must be fitted twice, on rank 0"
    assert not (ddp_run / "gmm_fits_rank1.txt").exists()
    before, after = _prior(ddp_run, "before", 0), _prior(ddp_run, "after", 0)
    assert not np.allclose(before["means"], after["means"]), "the GMM init did not happen"
    for when in ("before", "after", "end"):
        rank0, rank1 = _prior(ddp_run, when, 0), _prior(ddp_run, when, 1)
        for key in rank0:
            np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=f"{when}: {key}")


def test_ddp_result_comparable_to_one_process(ddp_run: Path, tmp_path: Path) -> None:
    ddp = json.loads((ddp_run / "result.json").read_text())
    single = _load_script().train(tmp_path, 1)
    assert single["world_size"] == 1
    assert abs(ddp["elbo"] - single["elbo"]) < 0.05 * abs(single["elbo"])
    assert ddp["kmeans_ari"] > 0.8 and single["kmeans_ari"] > 0.8
