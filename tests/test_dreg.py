"""Multimodal DReG: its expected encoder gradient is that of the stratified IWAE bound.

Monte Carlo on a small model with two overlapping experts, where a particle's own expert
has a share of the mixture well below one (the case in which dropping the share, its
derivative and the other experts' score terms biases the estimator). Each draw is one
"cell" with the same data and posterior, so one call gives many independent per-draw
gradients; IWAE and DReG use the same noise (paired draws), and the mean difference must be
within noise (a z-score threshold).
"""

from __future__ import annotations

import pytest
import torch

from scale_scvi.module._objectives import (
    mixture_log_weights,
    moe_importance_log_weights,
    moe_iwae_bound,
)
from scale_scvi.module._prior import GaussianMixturePrior

N_DRAWS = 20_000
Z_MAX = 4.0  # over 8 gradient coordinates per case, |z| > 4 has probability < 1e-3 by chance
# a sharp expert inside a broad one: each particle's own expert has a share well below one
EXPERT_MEANS = [[0.5, -0.5], [-0.2, 0.4]]
EXPERT_VARIANCES = [[0.05, 0.05], [0.5, 0.5]]


def _problem():
    """GMM prior (3 components, 2-D), a linear decoder to 20 Bernoulli features, 2 experts."""
    gen = torch.Generator().manual_seed(0)
    prior = GaussianMixturePrior(3, 2, min_var=0.0).double()
    prior.set_parameters(
        torch.tensor([0.3, 0.3, 0.4]),
        torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.0]]),
        torch.full((3, 2), 0.5),
    )
    weight = torch.randn(2, 20, generator=gen, dtype=torch.float64)
    bias = torch.randn(20, generator=gen, dtype=torch.float64)
    x = (torch.rand(20, generator=gen, dtype=torch.float64) < 0.4).double()
    expert_m = torch.tensor(EXPERT_MEANS, dtype=torch.float64)
    expert_v = torch.tensor(EXPERT_VARIANCES, dtype=torch.float64)

    def log_lik(z):
        logits = z @ weight + bias
        return (x * logits - torch.nn.functional.softplus(logits)).sum(-1)

    return prior, log_lik, expert_m, expert_v


def _per_draw_gradients(dreg, n_particles, kl_weight, mixture_logits=None, seed=1):
    """Gradient of the bound w.r.t. every draw's expert means and variances, ``(N, 8)``."""
    prior, log_lik, expert_m, expert_v = _problem()
    qz_m = expert_m.unsqueeze(1).expand(-1, N_DRAWS, -1).clone().requires_grad_(True)
    qz_v = expert_v.unsqueeze(1).expand(-1, N_DRAWS, -1).clone().requires_grad_(True)
    mask = torch.ones(2, N_DRAWS, dtype=torch.bool)
    log_alpha = None
    if mixture_logits is not None:
        log_alpha = mixture_log_weights(mask, torch.tensor(mixture_logits, dtype=torch.float64))
    torch.manual_seed(seed)
    log_w, _ = moe_importance_log_weights(
        log_lik,
        prior,
        qz_m,
        qz_v,
        mask,
        n_particles=n_particles,
        kl_weight=kl_weight,
        dreg=dreg,
        log_weights=log_alpha,
    )
    moe_iwae_bound(log_w, mask, log_alpha).sum().backward()
    return torch.cat([qz_m.grad, qz_v.grad], -1).permute(1, 0, 2).reshape(N_DRAWS, -1)


def paired_z_scores(n_particles, kl_weight, mixture_logits=None):
    """z-scores of the mean DReG - IWAE difference per coordinate, and the variance ratio."""
    iwae = _per_draw_gradients(False, n_particles, kl_weight, mixture_logits)
    dreg = _per_draw_gradients(True, n_particles, kl_weight, mixture_logits)
    diff = dreg - iwae
    z = diff.mean(0) / (diff.std(0) / N_DRAWS**0.5)
    return z, dreg.var(0) / iwae.var(0)


@pytest.mark.parametrize("n_particles", [1, 4])
@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_multimodal_dreg_is_unbiased(n_particles, kl_weight):
    z, _ = paired_z_scores(n_particles, kl_weight)
    assert z.abs().max() < Z_MAX, f"DReG - IWAE z-scores {z.tolist()}"


def test_multimodal_dreg_is_unbiased_with_unequal_mixture_weights():
    z, _ = paired_z_scores(4, 1.0, mixture_logits=[1.0, -0.5])
    assert z.abs().max() < Z_MAX, f"DReG - IWAE z-scores {z.tolist()}"


def test_multimodal_dreg_reduces_to_dreg_gradients_without_nans_for_missing_experts():
    """A cell with one expert gets finite gradients, and none reach its missing expert."""
    prior, log_lik, expert_m, expert_v = _problem()
    qz_m = expert_m.unsqueeze(1).expand(-1, 3, -1).clone().requires_grad_(True)
    qz_v = expert_v.unsqueeze(1).expand(-1, 3, -1).clone().requires_grad_(True)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    torch.manual_seed(0)
    log_w, _ = moe_importance_log_weights(log_lik, prior, qz_m, qz_v, mask, 4, dreg=True)
    moe_iwae_bound(log_w, mask).sum().backward()
    for grad in (qz_m.grad, qz_v.grad):
        assert torch.isfinite(grad).all()
        assert (grad[~mask] == 0).all()
